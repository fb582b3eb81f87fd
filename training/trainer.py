"""The training loop shared by every registered network (2D slices or 3D patches, CPU or CUDA, DDP).

Reproducibility: the model is initialised from ``seed``; every training sample (which slice or
patch, and its augmentation) is drawn from a generator seeded with ``(seed, epoch, index)``, and the
sample order from ``(seed, epoch)``, so an epoch depends only on the weights, the optimizer state
and the epoch number.  ``last.pt`` stores those (plus the python/numpy/torch RNG states), so a run
resumed with ``--resume auto`` continues as an uninterrupted run would, bit for bit on the CPU:

* after SIGINT/SIGTERM (a clean stop), also in the middle of an epoch: ``last.pt`` then holds the
  weights and optimizer state after the last finished step, the step count and the epoch's loss
  so far, and the resumed run skips exactly those batches;
* after SIGKILL or a crash, from the end of the last finished epoch (the interrupted epoch is
  redone from the same state, so it comes out the same);
* on CUDA the kernels themselves need not be deterministic, so a resumed run may differ in the
  last bits there; a resume with other settings (learning rate, batch size, ...) is warned about.

Files: each epoch ends by writing ``best.pt`` (when the Dice improved), then ``last.pt`` (which
carries the epoch's log record), then the record in ``metrics.jsonl``; so a kill at any point
leaves a ``best.pt`` that is never older than the best Dice a resumed run reports, and a resumed
run restores a record the kill kept from the log: every epoch is logged exactly once.  Temporary
files of killed checkpoint writes are removed when a run starts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from napari_covidseg.atomic_file import atomic_path, sweep_temporaries
from napari_covidseg.checkpoint import build_network, load_checkpoint, load_shipped, read_raw, save_checkpoint
from napari_covidseg.errors import CovidsegError, DataFolderError, InputError
from napari_covidseg.inference import predict_volume, resolve_device
from napari_covidseg.intensity import CT_SEG_PNG_RECIPE, DISPLAY8, HU, LUNG_WINDOW
from napari_covidseg.metrics import all_metrics
from napari_covidseg.models.registry import CLASS_NAMES, NetworkSpec
from napari_covidseg.preprocessing import Preprocessing

from . import distributed
from .config import TrainConfig
from .datasets import Case, absent_label_warnings, load_sources
from .metrics_log import MetricsLog
from .samples import CHANNELS, PreparedCase, SampleDataset
from .signals import StopFlag
from .sources import sampling_shares
from .splits import make_split, read_split, write_split

STEP_RECORD_SECONDS = 10.0  # how often the training loop writes a within-epoch progress record
HU_TO_DISPLAY8 = {"recipe": CT_SEG_PNG_RECIPE, "lung_window": LUNG_WINDOW}
DEFAULT_3D_INPLANE = (128, 128)
#: files of the output folder written through atomic_path (their temporary files are swept at start)
RUN_FILES = ("last.pt", "best.pt", "split.json", "config.json")
#: settings that change what a resumed run computes (a resume with other values is warned about)
SCHEDULE_FIELDS = ("optimizer", "lr", "weight_decay", "schedule", "epochs", "batch_size", "input_size", "crop_size",
                   "augmentation", "augmentation_probabilities", "loss_kwargs", "momentum", "poly_power",
                   "plateau_factor", "plateau_patience", "target", "seed", "samples_per_epoch", "max_steps_per_epoch",
                   "lung_slice_weight", "target_spacing", "inplane_size", "domain", "hu_to_display8")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def training_domain(cfg: TrainConfig, cases: Sequence[Case]) -> str:
    """The intensity domain the network learns in: ``cfg.domain``, or (``auto``) 8-bit display as
    soon as one case is 8-bit (HU can be mapped into 8-bit, not back), else HU."""
    domains = {c.domain for c in cases}
    if cfg.domain == "auto":
        return DISPLAY8 if DISPLAY8 in domains else HU
    if cfg.domain == HU and DISPLAY8 in domains:
        names = [c.case_id for c in cases if c.domain == DISPLAY8][:3]
        raise DataFolderError(f"--domain hu cannot use 8-bit display images ({', '.join(names)} ...): HU cannot be recovered "
                              "from them; train with --domain display8 (HU cases are then mapped to 8-bit) or leave them out")
    return cfg.domain


def training_preprocessing(spec: NetworkSpec, cfg: TrainConfig, domain: str = HU) -> Preprocessing:
    """The spec's preprocessing with the sizes and the domain this run trains in (stored in the checkpoint).

    8-bit runs: a HU CT is mapped by ``cfg.hu_to_display8``; a 3D network resizes slices to
    ``cfg.inplane_size`` instead of resampling to a spacing (the spacing of 8-bit sets is unknown).
    """
    d = spec.preprocessing.to_dict()
    d["domain"] = domain
    if domain == DISPLAY8:
        d["hu_to_display8"] = HU_TO_DISPLAY8[cfg.hu_to_display8].to_dict()
    if spec.dims == 2:
        d["inplane_size"] = list(cfg.input_size)
    elif domain == DISPLAY8:
        d["target_spacing"] = None
        d["inplane_size"] = list(cfg.inplane_size or DEFAULT_3D_INPLANE)
    elif cfg.target_spacing is not None:
        d["target_spacing"] = list(cfg.target_spacing)
    return Preprocessing.from_dict(d)


# ------------------------------------------------------------------------------------------------
# optimisation
# ------------------------------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=True)


def make_scheduler(cfg: TrainConfig, optimizer):
    """Stepped once per epoch (plateau: on the validation mean Dice)."""
    epochs = int(cfg.epochs)
    if cfg.schedule == "poly":
        # cfg.epochs is read at each step: a time budget re-plans it after every epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: max(0.0, 1.0 - e / int(cfg.epochs)) ** cfg.poly_power)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=float(cfg.plateau_factor),
                                                          patience=int(cfg.plateau_patience))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def refit_schedule(scheduler, epochs: int) -> None:
    """Re-plan a poly (its lambda reads cfg.epochs, already changed) or cosine schedule over ``epochs``
    and set the learning rate of the epoch to come as if it had been planned so from the start."""
    step = scheduler.last_epoch
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        scheduler.T_max = epochs
        rates = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / epochs)) / 2
                 for base in scheduler.base_lrs]
    elif isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    else:  # plateau: nothing planned by epochs
        return
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = list(rates)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _mean_metrics(items: List[dict]) -> Dict[str, float]:
    return {k: float(np.mean([m[k] for m in items])) for k in ("dice", "iou", "sensitivity", "specificity")}


def validate(model, spec: NetworkSpec, prep: Preprocessing, cases: List[Case], device, cfg: TrainConfig,
             patch_size=None) -> Tuple[Dict[str, Dict[str, float]], float, float, Dict[str, dict]]:
    """Whole-volume prediction of the validation cases (as at inference); returns per-class mean
    metrics, the mean Dice over the chosen classes, a validation loss (BCE of the probabilities)
    and the per-class means of each data source.

    A case whose mask of a class is empty (a healthy lung has no infection) has no Dice to give
    (1 or 0 on a single voxel); it adds ``false_positive_pct`` (that class predicted, as a share of
    the lung) to the summary instead, and the Dice means are over the cases that have the class.
    """
    per_class = {name: [] for name in CLASS_NAMES}
    per_source: Dict[str, Dict[str, list]] = {}
    healthy: Dict[str, list] = {name: [] for name in CLASS_NAMES}
    losses = []
    was_training = model.training
    for case in cases:
        prob = predict_volume(model, spec, case.ct, case.spacing, prep, device=device, batch_size=max(1, cfg.batch_size),
                              patch_size=patch_size, amp=cfg.amp, domain=case.domain)
        lung_voxels = max(1, int(np.count_nonzero(case.lung))) if case.lung is not None else prob[0][0].size
        for c, name in enumerate(CLASS_NAMES):
            gt = case.lung if c == 0 else case.infection
            if gt is None or c not in CHANNELS[cfg.target]:
                continue
            p = np.clip(prob[c], 1e-6, 1 - 1e-6)
            g = gt > 0
            losses.append(float(-np.mean(np.where(g, np.log(p), np.log(1 - p)))))
            if not g.any():
                healthy[name].append(100.0 * np.count_nonzero(prob[c] > 0.5) / lung_voxels)
                continue
            m = all_metrics(prob[c] > 0.5, gt, spacing=case.spacing, prob=prob[c], with_hd95=False)
            per_class[name].append(m)
            per_source.setdefault(case.source or "data", {}).setdefault(name, []).append(m)
    model.train(was_training)
    summary = {name: _mean_metrics(items) for name, items in per_class.items() if items}
    for name, shares in healthy.items():
        if shares:
            summary.setdefault(name, {})["false_positive_pct"] = float(np.mean(shares))
    by_source = {src: {name: _mean_metrics(items) for name, items in classes.items()} for src, classes in per_source.items()}
    chosen = [CLASS_NAMES[c] for c in CHANNELS[cfg.target] if "dice" in summary.get(CLASS_NAMES[c], {})]
    dice_mean = float(np.mean([summary[n]["dice"] for n in chosen])) if chosen else float("nan")
    return summary, dice_mean, float(np.mean(losses)) if losses else float("nan"), by_source


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------
#: what a fine-tuned checkpoint keeps of the one it started from (its model card then tells both legs)
PROVENANCE_KEYS = ("run_recipe", "device", "gpu", "epochs_trained", "epochs_done", "wall_minutes",
                   "time_budget_minutes", "runs_sharing_gpu", "initialised_from")


def weights_provenance(loaded) -> dict:
    """Where a fine-tuning run's starting weights came from: their file, digest and date, how they were
    trained (``PROVENANCE_KEYS``, chains of fine-tunings included) and their validation metrics (only those:
    held-out figures stored in shipped weights stay out of anything a run reads)."""
    raw = loaded.raw or {}
    training = raw.get("training") or {}
    metrics = raw.get("metrics") or {}
    return {"file": Path(str(loaded.path)).name, "digest": raw.get("digest"), "created": raw.get("created"),
            "training": {k: training[k] for k in PROVENANCE_KEYS if training.get(k) is not None},
            "val_metrics": {k: metrics[k] for k in ("val", "val_dice_mean", "epoch") if k in metrics}}


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    if not state:
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _count(values) -> List[Tuple[str, int]]:
    out: Dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return sorted(out.items())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, stop: Optional[StopFlag] = None, echo=None, cases: Optional[List[Case]] = None):
        self.cfg = cfg
        self.given_cases = cases  # already-read cases (benchmarks); None: read cfg.data
        self.stop = stop or StopFlag()
        self.out = Path(cfg.out)
        self.echo = echo

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        self.spec = cfg.spec()
        self.device = resolve_device(cfg.device)
        self.dist = distributed.init(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device(f"cuda:{self.dist.local_rank}")
            torch.cuda.set_device(self.device)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.is_main = self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.out, enabled=self.is_main, echo=self.echo if self.is_main else None)
        if self.is_main:  # what a killed run left: temporary checkpoint files, half a log line
            swept = sweep_temporaries(self.out, RUN_FILES)
            if swept:
                self.log.line(f"removed {len(swept)} temporary file(s) of an interrupted run: {', '.join(p.name for p in swept)}")
            if self.log.repair():
                self.log.line("cut a partial last line of metrics.jsonl (a run was killed while writing it)")
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _read_cases(self) -> List[Case]:
        cfg = self.cfg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.given_cases is not None:
                self.layout, self.sources, cases = "given", [], list(self.given_cases)
            else:
                data = f"{cfg.data},layout={cfg.layout}" if isinstance(cfg.data, str) and cfg.layout != "auto" else cfg.data
                self.sources, layouts, cases = load_sources(data, cfg.phantom_cases, cfg.phantom_shape)
                self.layout = layouts[0] if len(layouts) == 1 else "+".join(layouts)
        for w in caught:
            self.log.line(f"warning: {w.message}")
        return cases

    def _data(self):
        cfg = self.cfg
        cases = self._read_cases()
        needed = [CLASS_NAMES[c] for c in CHANNELS[cfg.target]]
        usable = [c for c in cases if any(n in c.labels() for n in needed)]
        dropped = [c.case_id for c in cases if c not in usable]
        if dropped:
            self.log.line(f"warning: {len(dropped)} case(s) have no {' or '.join(needed)} mask and are left out: {', '.join(dropped[:10])}")
        partial = [c.case_id for c in usable if not all(n in c.labels() for n in needed)]
        if partial:
            self.log.line(f"{len(partial)} case(s) train only the labels they have (the others are masked out of the loss): "
                          f"{', '.join(partial[:5])}{' ...' if len(partial) > 5 else ''}")
        if len(usable) < 2:
            raise DataFolderError(f"only {len(usable)} case(s) have a {' or '.join(needed)} mask; at least 2 are needed")
        self.domain = training_domain(cfg, usable)
        if cfg.split_file:
            split = read_split(cfg.split_file)
            missing = sorted(set(split["train"] + split["val"]) - {c.case_id for c in usable})
            if missing:
                raise DataFolderError(f"the split {cfg.split_file} names cases not in the data: {', '.join(missing[:5])}")
            absent_test = sorted(set(split["test"]) - {c.case_id for c in usable})
            if absent_test:  # training never reads the test cases: they may be kept elsewhere
                self.log.line(f"{len(absent_test)} test case(s) of the split are not in the data (not needed to train)")
        else:
            split = make_split([c.case_id for c in usable], [c.group for c in usable], cfg.val_fraction, cfg.test_fraction,
                               cfg.folds, cfg.fold, cfg.seed)
        split.update({"data": [s.to_text() for s in self.sources] or str(cfg.data), "layout": self.layout})
        by_id = {c.case_id: c for c in usable}
        self.split = split
        self.train_cases = [by_id[i] for i in split["train"]]
        self.val_cases = [by_id[i] for i in split["val"]]
        if not self.train_cases or not self.val_cases:
            raise DataFolderError("the split leaves no training or no validation case; use more cases or another --val-fraction")
        self.log.line(f"intensity domain: {self.domain} ({', '.join(f'{d}: {n}' for d, n in _count(c.domain for c in usable))} cases)")
        for text in (absent_label_warnings(usable, needed) + absent_label_warnings(self.val_cases, needed, "validation case")):
            self.log.line(f"warning: {text}")

    def _source_shares(self) -> Optional[Dict[str, float]]:
        """Share of the samples per source name (``None``: every slice equally likely)."""
        if not any(s.weight is not None for s in self.sources):
            return None
        slices = [sum(c.ct.shape[0] for c in self.train_cases if c.source == s.name) for s in self.sources]
        present = [(s, n) for s, n in zip(self.sources, slices) if n > 0]
        shares = sampling_shares([s for s, _ in present], [n for _, n in present])
        return {s.name: share for (s, _), share in zip(present, shares)}

    def _model(self):
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.prep = training_preprocessing(self.spec, cfg, self.domain)
        src, self.init_source = None, None
        resumed = read_raw(cfg.resume, map_location="cpu") if cfg.resume else None  # verified, optimizer state included
        if cfg.init_from:
            src = load_shipped(cfg.network) if cfg.init_from == "shipped" else load_checkpoint(cfg.init_from, expected_network=cfg.network)
            if not cfg.network_kwargs:  # fine-tune the architecture the weights were made for
                cfg.network_kwargs = dict(src.network_kwargs)
            if {**self.spec.default_kwargs, **src.network_kwargs} != {**self.spec.default_kwargs, **cfg.network_kwargs}:
                raise InputError(f"--init-from weights were built with {src.network_kwargs}, this run asks for {cfg.network_kwargs}; "
                                 "leave --network-kwargs out (the weights' own are used) or pass the same")
        elif resumed is not None and not cfg.network_kwargs:  # continue with the architecture the run was started with
            if resumed.get("network") == cfg.network:  # (another network's checkpoint is refused by _resume)
                cfg.network_kwargs = dict(resumed.get("network_kwargs") or {})
        model = build_network(self.spec, dict(cfg.network_kwargs), "--network-kwargs",
                              hint="give arguments the network's constructor takes, e.g. '{\"base\": 16}'")
        if src is not None:
            model.load_state_dict(src.model.state_dict())
            self.init_source = weights_provenance(src)
            self.log.line(f"initialised from {src.path}")
        model.to(self.device)
        if self.spec.dims == 2 and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.loss_fn = self.spec.loss(**(cfg.loss_kwargs or {}))
        self.optimizer = make_optimizer(cfg, model.parameters())
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ddp_model = model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.start_epoch, self.best, self.wall_seconds = 0, -math.inf, 0.0
        self.resume_step, self.resume_epoch_state, self.resume_record, self._resume_rng = 0, {}, {}, None
        if cfg.resume:
            self._resume(cfg.resume, resumed)

    def _resume(self, path, raw: dict):
        """Continue from checkpoint ``path``, whose verified contents (``read_raw``) are ``raw``."""
        cfg = self.cfg
        if raw.get("network") != cfg.network:
            raise InputError(f"--resume {path} holds a `{raw.get('network')}`, not a `{cfg.network}`")
        extra = raw.get("extra") or {}
        if "optimizer" not in extra:
            raise InputError(f"{path} holds no training state (it is a weights-only checkpoint); use --init-from to fine-tune from it")
        stored = dict(raw.get("network_kwargs") or {})
        if {**self.spec.default_kwargs, **stored} != {**self.spec.default_kwargs, **cfg.network_kwargs}:
            raise InputError(f"--resume {path} was trained with network arguments {stored}, this run asks for "
                             f"{cfg.network_kwargs}; resume with the settings the run started with (the same "
                             "--network-kwargs or --net-kwargs-shipped)")
        loaded = load_checkpoint(path, expected_network=cfg.network, map_location="cpu")
        self.model.load_state_dict(loaded.model.state_dict())
        self._load_training_state(path, extra)
        self.start_epoch = int(extra["epoch"])
        self.best = float(extra.get("best", -math.inf)) if extra.get("best") is not None else -math.inf
        self._resume_rng = extra.get("rng")
        self.wall_seconds = float(extra.get("wall_seconds") or 0.0)
        # written since mid-epoch stops resume exactly; older checkpoints redo the interrupted epoch
        self.resume_step = int(extra.get("step") or 0)
        self.resume_epoch_state = dict(extra.get("epoch_state") or {})
        self.resume_record = dict(extra.get("record") or {})
        self.init_source = (raw.get("training") or {}).get("initialised_from")
        self._warn_changed_settings(path, extra.get("config") or {})
        where = f"after step {self.resume_step} of epoch {self.start_epoch + 1}" if self.resume_step else f"after epoch {self.start_epoch}"
        self.log.line(f"resumed from {path} {where}")

    def _load_training_state(self, path, extra: dict) -> None:
        """Optimizer, schedule and AMP scaler state, or one line saying why they do not fit this run."""
        before = extra.get("config") or {}
        stored_groups = (extra["optimizer"] or {}).get("param_groups") or [{}]
        fresh_groups = self.optimizer.state_dict()["param_groups"]
        if (before.get("optimizer") not in (None, self.cfg.optimizer)
                or set(stored_groups[0]) != set(fresh_groups[0]) or len(stored_groups) != len(fresh_groups)):
            raise InputError(f"--resume {path} was trained with the {before.get('optimizer', 'another')!r} optimizer, "
                             f"this run uses {self.cfg.optimizer!r}; resume with the same --optimizer (or start a new "
                             "run, e.g. --init-from the checkpoint)")
        try:
            self.optimizer.load_state_dict(extra["optimizer"])
            self.scheduler.load_state_dict(extra["scheduler"])
            if extra.get("scaler"):
                self.scaler.load_state_dict(extra["scaler"])
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise InputError(f"--resume {path}: its optimizer/schedule state does not fit this run ({reason}); it was "
                             f"trained with optimizer {before.get('optimizer')!r} and schedule {before.get('schedule')!r}, "
                             f"this run uses {self.cfg.optimizer!r} and {self.cfg.schedule!r}; resume with the same settings") from None

    def _warn_changed_settings(self, path, before: dict) -> None:
        now = json.loads(json.dumps(self.cfg.to_dict()))  # as stored: tuples are lists there
        changed = [f"{k} {before[k]!r} -> {now.get(k)!r}" for k in SCHEDULE_FIELDS if k in before and before[k] != now.get(k)]
        if changed:
            self.log.line(f"warning: resuming {path} with other settings than its run had ({'; '.join(changed)}): the "
                          "result will differ from an uninterrupted run")

    def _loader(self):
        cfg = self.cfg
        prepared = [PreparedCase(c, self.prep, self.spec.dims, CHANNELS[cfg.target]) for c in self.train_cases]
        if cfg.samples_per_epoch:
            length = int(cfg.samples_per_epoch)
        elif self.spec.dims == 2:
            length = int(sum(p.image.shape[0] for p in prepared))
        else:
            length = max(int(cfg.batch_size) * 4, len(prepared) * 4)
        if cfg.max_steps_per_epoch:
            length = min(length, int(cfg.max_steps_per_epoch) * int(cfg.batch_size) * self.dist.world_size)
        self.dataset = SampleDataset(prepared, self.spec.dims, cfg.input_size, cfg.augmentation, cfg.augmentation_probabilities,
                                     length, cfg.seed, cfg.lung_slice_weight, crop_size=cfg.crop_size,
                                     source_shares=self._source_shares())
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = max(1, math.ceil(len(self.sampler) / int(cfg.batch_size)))
        self.skipping = SkipSampler(self.sampler)
        self.loader = DataLoader(self.dataset, batch_size=int(cfg.batch_size), sampler=self.skipping,
                                 num_workers=int(cfg.num_workers), drop_last=False,
                                 pin_memory=self.device.type == "cuda")

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, path, epoch, metrics, half=False, step=0, epoch_state=None, record=None):
        """A checkpoint after ``epoch`` finished epochs and ``step`` steps of the next (with its loss so far
        in ``epoch_state``); ``record`` is the finished epoch's log record (restored if a kill loses it)."""
        cfg = self.cfg
        training = {"data": self.split["data"], "layout": self.layout, "domain": self.domain,
                    "domains": dict(_count(c.domain for c in self.train_cases + self.val_cases)),
                    "n_train": len(self.train_cases), "n_val": len(self.val_cases),
                    "split": {k: self.split[k] for k in ("train", "val", "test", "seed", "method")},
                    "recipe": {k: getattr(cfg, k) for k in ("optimizer", "lr", "weight_decay", "schedule", "epochs", "batch_size",
                                                            "input_size", "crop_size", "augmentation", "target")},
                    "epochs_done": epoch, "seed": cfg.seed, "device": str(self.device),
                    "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                    "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                    "wall_minutes": round(self.wall_seconds / 60.0, 1)}
        if self.init_source:
            training["initialised_from"] = self.init_source
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.amp else {}, "epoch": epoch,
                 "best": None if not math.isfinite(self.best) else self.best, "rng": rng_state(),
                 "sampler_epoch": epoch, "config": cfg.to_dict(), "wall_seconds": self.wall_seconds,
                 "step": int(step), "epoch_state": dict(epoch_state or {}), "record": dict(record or {})}
        save_checkpoint(path, self.model, cfg.network, cfg.network_kwargs, self.prep, training=training,
                        metrics=metrics, extra=extra, half=half)

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> str:
        """Train; returns the end status (``finished`` or ``stopped``). Errors propagate."""
        cfg = self.cfg
        self._setup()
        self.log.line(f"training `{cfg.network}` on {cfg.data} ({self.device}, {self.dist.world_size} process(es))")
        self._data()
        self._model()
        if self.is_main:
            self._write_run_files()
        self._loader()
        last, best = self.out / "last.pt", self.out / "best.pt"
        status = "finished"
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.line(f"{n_params} parameters; train {len(self.train_cases)} cases, val {len(self.val_cases)} cases; "
                      f"{len(self.dataset)} samples per epoch")
        self.loop_started, self.val_seconds, self.planned_epochs = time.time(), 0.0, int(cfg.epochs)
        epoch = self.start_epoch - 1
        while epoch + 1 < int(cfg.epochs):  # cfg.epochs: a time budget re-plans it after every epoch
            epoch += 1
            epoch_started = time.time()
            done = self._train_epoch(epoch, self.resume_step if epoch == self.start_epoch else 0)
            if done["stopped"]:
                if self.is_main:  # exactly where it stopped: a resume skips the steps done and goes on
                    self._save(last, epoch, {}, step=done["steps"],
                               epoch_state={k: done[k] for k in ("loss", "samples", "seconds")})
                status = "stopped"
                break
            self._finish_epoch(epoch, done, last, best)
            distributed.barrier(self.dist)
            if self.stop.stopped:
                status = "stopped"
                break
            if cfg.stop_after_epochs is not None and epoch + 1 >= int(cfg.stop_after_epochs) and epoch + 1 < int(cfg.epochs):
                status = "stopped"
                break
            if cfg.time_budget_minutes and self._over_budget(epoch, time.time() - epoch_started):
                status = "stopped"
                break
        if self.is_main:
            self.log.record("end", status=status, last_checkpoint=str(last), best_checkpoint=str(best) if best.exists() else None,
                            error=None, best_val_dice_mean=self.best if math.isfinite(self.best) else None)
            self.log.line(f"{status}: last checkpoint {last}")
        distributed.cleanup(self.dist)
        return status

    def _over_budget(self, epoch: int, epoch_seconds: float) -> bool:
        """Fit the planned epochs to ``time_budget_minutes`` after every epoch, from the latest epoch's
        training time and the latest validation's cost (the first epoch is validated to measure it, and
        it is slow: start-up, autotuning), never above the epochs first planned.  A plan may grow, even
        at what was its last epoch (epochs speed up when runs beside it on the GPU end); a poly or cosine
        schedule is re-planned so it still ends with the run.  True when the next epoch would end past
        the budget anyway."""
        cfg = self.cfg
        budget = float(cfg.time_budget_minutes) * 60.0
        elapsed = time.time() - self.loop_started
        if self.validated_last:
            self.val_seconds = max(0.0, epoch_seconds - self.last_train_seconds)
        every = max(1, int(cfg.val_every or 1))
        per_epoch = max(self.last_train_seconds + self.val_seconds / every, 1e-6)
        fitting = epoch + 1 + int(max(0.0, budget - elapsed - self.val_seconds) // per_epoch)
        fitting = distributed.broadcast_object(min(self.planned_epochs, fitting), self.dist)  # rank 0's timing rules
        if fitting != int(cfg.epochs):
            before, cfg.epochs = int(cfg.epochs), max(epoch + 1, fitting)
            refit_schedule(self.scheduler, int(cfg.epochs))
            if self.is_main:
                self.log.record("budget", planned_epochs=self.planned_epochs, epochs=int(cfg.epochs), after_epoch=epoch + 1,
                                epoch_seconds=per_epoch, budget_minutes=float(cfg.time_budget_minutes))
                if epoch == self.start_epoch:
                    self.log.line(f"time budget {cfg.time_budget_minutes:g} min: {cfg.epochs} epochs instead of {before} "
                                  f"({per_epoch:.1f} s per epoch so far; re-fitted after every epoch)")
                self._write_config()
        return bool(distributed.broadcast_object(epoch + 1 < int(cfg.epochs) and elapsed + epoch_seconds > budget, self.dist))

    def _write_config(self) -> None:
        with atomic_path(self.out / "config.json") as tmp:
            tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def _write_run_files(self) -> None:
        """split.json, config.json, the epoch record a kill kept from the log, and the start record."""
        cfg = self.cfg
        write_split(self.split, self.out / "split.json")
        self._write_config()
        record = self.resume_record
        if record and not self.resume_step and record.get("epoch") not in {r.get("epoch") for r in self.log.records("epoch")}:
            self.log.record("epoch", **{k: v for k, v in record.items() if k != "event"}, recovered=True)
            self.log.line(f"epoch {record.get('epoch')}: its log record was lost when the run was killed; restored from "
                          f"{cfg.resume}")
        self.log.record("start", network=cfg.network, config=cfg.to_dict(), device=str(self.device.type),
                        epochs=int(cfg.epochs), time=time.time(), resumed_from_epoch=self.start_epoch,
                        resumed_from_step=self.resume_step, split={k: self.split[k] for k in ("train", "val", "test")})

    def _train_epoch(self, epoch: int, skip: int) -> dict:
        """One epoch's steps from step ``skip`` on; returns the loss sum, samples, steps, seconds and
        whether a stop was asked for (the optimizer step in progress is finished first)."""
        cfg = self.cfg
        t0 = time.time()
        state = {"loss": 0.0, "samples": 0, "seconds": 0.0, **(self.resume_epoch_state if skip else {})}
        self.dataset.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.skipping.skip = skip * int(cfg.batch_size)
        self.ddp_model.train()
        # the RNG state of the checkpoint was taken before this epoch's loader drew its seed from the global
        # RNG (epoch end), or after it (a stop mid-epoch): restore it at the same point
        resume_rng = self._resume_rng if epoch == self.start_epoch else None
        if resume_rng and not skip:
            set_rng_state(resume_rng)
        batches = iter(self.loader)
        if resume_rng and skip:
            set_rng_state(resume_rng)
        steps, stopped = skip, False
        for x, y, w in batches:
            x, y, w = (t.to(self.device, non_blocking=True) for t in (x, y, w))
            if self.spec.dims == 2 and self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            progress = (epoch + steps / self.steps_per_epoch) / int(cfg.epochs)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                outputs = self.ddp_model(x)
            outputs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in outputs.items()}
            loss, _parts = self.loss_fn(outputs, y, progress, weight=w)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate (--lr)")
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            state["loss"] += float(loss.detach()) * x.shape[0]
            state["samples"] += x.shape[0]
            steps += 1
            self._report_step(epoch, steps, state)
            if distributed.any_true(self.stop.stopped, self.dist, self.device):
                stopped = True
                break
        state["seconds"] += time.time() - t0
        self.last_train_seconds = time.time() - t0
        return {**state, "steps": steps, "stopped": stopped}

    def _report_step(self, epoch: int, steps: int, state: dict) -> None:
        """A ``step`` record at most every ``STEP_RECORD_SECONDS`` (the GUI's within-epoch bar);
        the epoch records stay the ones that count (a lost step record costs nothing)."""
        now = time.time()
        if not self.is_main or now - getattr(self, "_last_step_record", 0.0) < STEP_RECORD_SECONDS:
            return
        self._last_step_record = now
        self.log.record("step", epoch=epoch + 1, epochs=int(self.cfg.epochs), step=steps, steps=self.steps_per_epoch,
                        train_loss=state["loss"] / max(1, state["samples"]))

    def _validation_due(self, epoch: int) -> bool:
        """Validate every ``val_every`` epochs (epochs val_every, 2 val_every, ... counted from 1) and
        always after the last one, so a run ends with a validated ``best.pt``."""
        every = max(1, int(self.cfg.val_every or 1))
        budget_probe = bool(self.cfg.time_budget_minutes) and epoch == self.start_epoch  # the budget needs its cost
        return (epoch + 1) % every == 0 or epoch + 1 == int(self.cfg.epochs) or budget_probe

    def _finish_epoch(self, epoch: int, done: dict, last: Path, best: Path) -> None:
        """Validate (when due), step the schedule, write best.pt (if improved), last.pt, then the log
        record.  Between validations the record has no ``val`` fields, the plateau schedule waits for
        the next validation and ``best.pt`` is not touched: it is chosen at validated epochs only."""
        cfg = self.cfg
        epochs = int(cfg.epochs)
        train_loss = distributed.mean_value(done["loss"] / max(1, done["samples"]), self.dist, self.device)
        record = {"epoch": epoch + 1, "epochs": epochs, "train_loss": train_loss}
        validated = self._validation_due(epoch)
        self.validated_last = validated
        if self.is_main and validated:
            summary, dice_mean, val_loss, by_source = validate(self.model, self.spec, self.prep, self.val_cases,
                                                               self.device, cfg)
            record.update(val_loss=val_loss, val=summary, val_dice_mean=dice_mean, val_by_source=by_source)
        dice_mean = distributed.broadcast_object(record.get("val_dice_mean"), self.dist)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if cfg.schedule != "plateau":
            self.scheduler.step()
        elif validated:
            self.scheduler.step(dice_mean if dice_mean is not None and math.isfinite(dice_mean) else 0.0)
        seconds = done["seconds"]
        self.wall_seconds += seconds
        improved = dice_mean is not None and math.isfinite(dice_mean) and dice_mean > self.best
        if improved:
            self.best = float(dice_mean)
        if not self.is_main:
            return
        record.update(lr=lr, seconds=seconds, throughput=done["samples"] * self.dist.world_size / max(seconds, 1e-9),
                      device=str(self.device.type))
        metrics = {"val": record.get("val"), "val_dice_mean": dice_mean, "epoch": epoch + 1}
        if improved or (validated and not best.exists()):  # best first: a kill before last.pt redoes this epoch
            self._save(best, epoch + 1, {**metrics, "best": True})
        self._save(last, epoch + 1, metrics, record=record)
        self.log.record("epoch", **record)
        val = record.get("val") or {}
        self.log.line(f"epoch {epoch + 1}/{epochs} loss {train_loss:.4f} "
                      + ("val dice " if validated else "(not validated) ")
                      + " ".join(f"{k} {v['dice']:.3f}" for k, v in val.items() if "dice" in v)
                      + "".join(f" ({k} false positives in healthy cases {v['false_positive_pct']:.2f}% of lung)"
                                for k, v in val.items() if "false_positive_pct" in v)
                      + f" lr {lr:.2e} {seconds:.1f}s")


class SkipSampler(Sampler):
    """The indices of ``sampler`` after the first ``skip`` (a run resumed mid-epoch skips the samples it
    already trained on, without drawing them)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def plain_error(exc: BaseException, out=None) -> str:
    """A message for the user, without a traceback (``out``: the output folder, named when a write failed)."""
    if isinstance(exc, CovidsegError):
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return ("the GPU ran out of memory; lower --batch-size or --input-size, use a smaller network "
                "(--net-kwargs-shipped or --network-kwargs), or train on the CPU (--device cpu)")
    if isinstance(exc, FloatingPointError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if getattr(exc, "filename", None) else (f"in {out}" if out is not None else "")
        return (f"cannot read or write {where}: {exc.strerror or exc}; check the disk (free space, permissions) "
                "and the paths").replace("  ", " ")
    return f"training failed unexpectedly: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def exit_code(exc: BaseException) -> int:
    """2 for what the user or the machine can fix (bad data or arguments, a full disk, a diverging loss,
    memory), 1 for an unexpected failure."""
    if isinstance(exc, (CovidsegError, OSError, FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError)):
        return 2
    return 2 if "out of memory" in str(exc).lower() else 1


def _log_failure(trainer: "Trainer", cfg: TrainConfig, exc: BaseException, message: str) -> None:
    """The failed end record and log lines, as far as the disk lets them be written (a full disk must not
    turn one error into two tracebacks)."""
    try:
        log = getattr(trainer, "log", None)
        if log is None:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            log = MetricsLog(cfg.out, enabled=int(os.environ.get("RANK", "0")) == 0)
        if exit_code(exc) == 1:
            log.line("unexpected error:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-6)))
        last, best = Path(cfg.out) / "last.pt", Path(cfg.out) / "best.pt"
        log.record("end", status="failed", last_checkpoint=str(last) if last.exists() else None,
                   best_checkpoint=str(best) if best.exists() else None, error=message)
        log.line(f"failed: {message}")
    except OSError:
        pass  # the caller reports the error; the log cannot hold it


def run_training(cfg: TrainConfig, echo=None, cases: Optional[List[Case]] = None) -> Tuple[int, str]:
    """Run with signal handling and end/failed records; returns ``(exit_code, status)``: 0, or 2 for an
    error the user can fix (bad data or arguments, a full disk, a diverging loss), 1 for an unexpected one."""
    stop = StopFlag().install()
    trainer = Trainer(cfg, stop=stop, echo=echo, cases=cases)
    try:
        status = trainer.run()
        return 0, status
    except BaseException as exc:  # noqa: BLE001 - every failure must end with a log record
        if isinstance(exc, (SystemExit,)):
            raise
        message = plain_error(exc, cfg.out)
        _log_failure(trainer, cfg, exc, message)
        trainer.error_message = message
        try:
            distributed.cleanup(trainer.dist)
        except Exception:
            pass
        return exit_code(exc), message
    finally:
        stop.uninstall()
