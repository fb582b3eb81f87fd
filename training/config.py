"""A training run's full configuration: the paper recipe, overridden by a JSON config file,
overridden by command-line flags (in that order).  Saved as ``config.json`` and in checkpoints."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from napari_covidseg.errors import InputError
from napari_covidseg.models.registry import NetworkSpec, get_network, network_names

from .augment import check_names

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("poly", "plateau", "cosine", "constant")
TARGETS = ("lung", "infection", "both")


@dataclass
class TrainConfig:
    network: str = "unet"
    data: Any = "phantom"  # a source string, or a list of them (see training.sources)
    layout: str = "auto"
    domain: str = "auto"  # intensity domain to learn in: auto | hu | display8
    hu_to_display8: str = "recipe"  # display8 runs: how a HU CT is mapped (recipe | lung_window)
    crop_size: Optional[List[int]] = None  # 2D: train on random crops of this size of the input_size slices
    inplane_size: Optional[List[int]] = None  # 3D display8: slices resized to this (default 128 x 128)
    out: str = "runs/train"
    # recipe (None = the paper's value from the NetworkSpec)
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    input_size: Optional[List[int]] = None
    augmentation: Optional[List[str]] = None
    augmentation_probabilities: Dict[str, float] = field(default_factory=dict)
    loss_kwargs: Optional[Dict[str, Any]] = None
    momentum: float = 0.9  # sgd / rmsprop
    poly_power: float = 0.9
    plateau_factor: Optional[float] = None  # None: the recipe's extra["plateau_factor"], else 0.1
    plateau_patience: Optional[int] = None  # None: the recipe's extra["plateau_patience"], else 10
    target_spacing: Optional[List[float]] = None  # 3D: resample to this (z, y, x) mm
    # what to learn and on what
    target: str = "both"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    folds: Optional[int] = None
    fold: Optional[int] = None
    split_file: Optional[str] = None  # reuse a split.json
    seed: int = 0
    phantom_cases: int = 8
    phantom_shape: List[int] = field(default_factory=lambda: [32, 192, 192])
    network_kwargs: Dict[str, Any] = field(default_factory=dict)
    net_kwargs_shipped: bool = False
    # how
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    samples_per_epoch: Optional[int] = None  # slices / patches drawn per epoch (default: all slices of the training cases)
    max_steps_per_epoch: Optional[int] = None
    lung_slice_weight: float = 0.9  # probability a 2D sample is drawn from slices that contain lung
    val_every: int = 1
    resume: Optional[str] = None
    init_from: Optional[str] = None
    stop_after_epochs: Optional[int] = None  # end this invocation (status stopped) after N epochs in total
    # wall-clock minutes for this invocation's epochs: after every epoch the planned epochs are re-fitted
    # to what fits (never above the first plan), so a poly/cosine schedule still ends; a run that overruns stops
    time_budget_minutes: Optional[float] = None
    threads: Optional[int] = None

    # ------------------------------------------------------------------------------------------
    def spec(self) -> NetworkSpec:
        try:
            return get_network(self.network)
        except KeyError:
            raise InputError(f"unknown network {self.network!r}; choose one of {', '.join(network_names())}") from None

    def resolve(self) -> "TrainConfig":
        """Fill every recipe field left ``None`` from the paper recipe and check the values."""
        spec = self.spec()
        r = spec.recipe
        for name in ("optimizer", "lr", "weight_decay", "schedule", "epochs", "batch_size"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(r, name))
        if self.input_size is None:
            self.input_size = list(r.input_size)
        if self.augmentation is None:
            self.augmentation = list(r.augmentation)
        self.augmentation = [a for a in self.augmentation if a != "none"]
        extra = dict(r.extra or {})
        if not self.augmentation_probabilities and "augmentation_p" in extra:
            # a paper that gives one probability for every transform (QC-HC: p = 0.15)
            self.augmentation_probabilities = {a: float(extra["augmentation_p"]) for a in self.augmentation}
        if self.plateau_factor is None:
            self.plateau_factor = float(extra.get("plateau_factor", 0.1))
        if self.plateau_patience is None:
            self.plateau_patience = int(extra.get("plateau_patience", 10))
        if self.loss_kwargs is None:
            self.loss_kwargs = recipe_loss_kwargs(spec)
        if self.net_kwargs_shipped and not self.network_kwargs:
            self.network_kwargs = dict(spec.shipped_kwargs)
        if spec.dims == 3 and self.target_spacing is None and spec.preprocessing.target_spacing is not None:
            self.target_spacing = list(spec.preprocessing.target_spacing)
        self.check(spec)
        return self

    def check(self, spec: NetworkSpec) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; use {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; use {', '.join(SCHEDULES)}")
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; use lung, infection or both")
        if int(self.epochs) < 1 or int(self.batch_size) < 1 or float(self.lr) <= 0:
            raise InputError("epochs and batch size must be at least 1 and the learning rate above 0")
        self.input_size = [int(v) for v in self.input_size]
        if len(self.input_size) != spec.dims or min(self.input_size) < 8:
            raise InputError(f"`{spec.name}` is a {spec.dims}D network: --input-size needs {spec.dims} sizes of at least 8, "
                             f"not {self.input_size}")
        try:
            check_names(self.augmentation)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if self.domain not in ("auto", "hu", "display8"):
            raise InputError(f"unknown domain {self.domain!r}; use auto, hu or display8")
        if self.hu_to_display8 not in ("recipe", "lung_window"):
            raise InputError(f"unknown HU -> 8-bit mapping {self.hu_to_display8!r}; use recipe or lung_window")
        if self.crop_size is not None:
            self.crop_size = [int(v) for v in self.crop_size]
            if spec.dims != 2 or len(self.crop_size) != 2 or min(self.crop_size) < 16 or \
                    any(c > i for c, i in zip(self.crop_size, self.input_size)):
                raise InputError(f"--crop-size is for 2D networks: two sizes of at least 16 and at most the input size "
                                 f"{self.input_size}, not {self.crop_size}")
            if any(c % spec.stride for c in self.crop_size):
                raise InputError(f"--crop-size must be a multiple of {spec.stride} for `{spec.name}`, not {self.crop_size}")
        if self.inplane_size is not None:
            self.inplane_size = [int(v) for v in self.inplane_size]
            if len(self.inplane_size) != 2 or min(self.inplane_size) < 16:
                raise InputError(f"--inplane-size needs two sizes of at least 16, not {self.inplane_size}")
        if self.time_budget_minutes is not None and float(self.time_budget_minutes) <= 0:
            raise InputError(f"--time-budget must be a positive number of minutes, not {self.time_budget_minutes}")
        if self.resume and self.init_from:
            raise InputError("choose either --resume (continue a run) or --init-from (fine-tune from weights), not both")
        if len(self.phantom_shape) != 3:
            raise InputError(f"--phantom-shape needs three sizes Z Y X, not {self.phantom_shape}")
        from napari_covidseg.checkpoint import build_network_skeleton

        build_network_skeleton(spec, dict(self.network_kwargs), "--network-kwargs")  # shapes only: no memory used

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def recipe_loss_kwargs(spec: NetworkSpec) -> dict:
    """Loss constructor arguments from the recipe's ``extra`` (``loss_kwargs``, or ``loss_weights``
    ``{"bce": w}`` mapped onto ``bce_weight=w`` when the loss takes such an argument)."""
    extra = dict(spec.recipe.extra or {})
    kwargs = dict(extra.get("loss_kwargs") or {})
    try:
        accepted = set(inspect.signature(spec.loss).parameters)
    except (TypeError, ValueError):
        accepted = set()
    for term, weight in dict(extra.get("loss_weights") or {}).items():
        if f"{term}_weight" in accepted:
            kwargs.setdefault(f"{term}_weight", weight)
    return kwargs


def read_config_file(path) -> dict:
    known = {f.name for f in fields(TrainConfig)}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"the config file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"the config file {path} must hold a JSON object of recipe fields")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"the config file {path} has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def build_config(config_file: Optional[str] = None, **overrides) -> TrainConfig:
    """Paper recipe < config file < ``overrides`` (flags; ``None`` values are ignored)."""
    values: Dict[str, Any] = {}
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).resolve()


def recipes_table() -> List[dict]:
    out = []
    for name in network_names():
        spec = get_network(name)
        r = spec.recipe
        out.append({"network": name, "title": spec.title, "dims": spec.dims, "optimizer": r.optimizer, "lr": r.lr,
                    "weight_decay": r.weight_decay, "schedule": r.schedule, "epochs": r.epochs, "batch_size": r.batch_size,
                    "input_size": list(r.input_size), "augmentation": list(r.augmentation), "loss": spec.loss.__name__,
                    "loss_kwargs": recipe_loss_kwargs(spec), "preprocessing": spec.preprocessing.to_dict(),
                    "default_kwargs": spec.default_kwargs, "shipped_kwargs": spec.shipped_kwargs, "paper": spec.paper})
    return out
