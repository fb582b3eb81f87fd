"""Train the shipped weights of every network on the real public CT of ``../shared/data``.

    python -m benchmarks.train_real_weights --network unet            # train (resumes <run>/last.pt if present)
    python -m benchmarks.train_real_weights --network unet --export   # write napari_covidseg/weights/unet.pt
    python -m benchmarks.train_real_weights --network unet --recipe gpu --time-budget 7   # on a lent GPU
    python -m benchmarks.train_real_weights --network unet --recipe gpu --from-shipped   # a further leg from the shipped weights
    python -m benchmarks.train_real_weights --network unet --recipe full   # the paper's full recipe

Data (see ``benchmarks/real_data_split.py`` for the fixed patient-group split):

* COVID-19-CT-Seg slices (dstaroff groups, 8-bit CLAHE display images, lung + infection), 70 % of
  the samples;
* Inf-Net / MedSeg slices (8-bit lung-window display images), infection only (their lung masks
  are derived and approximate, so that channel is masked out of the loss), 20 % of the samples;
* synthetic phantoms (HU, mapped to 8-bit by the same recipe as any HU CT), 7 with lesions and 5
  healthy, 15 % of the samples, so the HU -> 8-bit path, the built-in sample and lungs without
  any infection are seen in training (every real slice published with masks holds infection).

Every network learns in the 8-bit display domain; a CT in HU (the phantoms in training, any HU CT
at inference) is mapped through the radiological lung window (W 1500 / L -600 -> 0..255), stored in
the checkpoint.  The runs began with the COVID-19-CT-Seg PNG recipe (per slice min-max + CLAHE)
instead; it was replaced mid-run (see ``HU_MAPPING``).  ``CPU_BUDGET`` lists every
change from the paper recipes made so that a network trains on 2 CPU cores in a few hours; each
one is recorded in the run's config and in the model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from napari_covidseg.checkpoint import WEIGHTS_DIR, load_checkpoint, save_checkpoint
from napari_covidseg.models.registry import get_network, network_names

from training.config import build_config
from training.metrics_log import MetricsLog
from training.trainer import HU_TO_DISPLAY8, run_training

from .real_data_split import INFNET, SPLIT_PATH

HERE = Path(__file__).resolve().parent
DATA_ROOT = Path(os.environ.get("COVIDSEG_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
RUNS = HERE / "runs" / "real"

# the papers' geometric transforms, plus intensity and low-resolution changes so one network
# reads CLAHE slices, lung-window JPGs and HU CT of any resolution mapped to 8-bit
AUGMENT_2D = ["flip", "rotate", "scale", "gamma", "brightness", "contrast", "noise", "lowres"]


def augmentation_for(network: str) -> list:
    """2D: ``AUGMENT_2D``.  3D: the paper's transforms plus the low-resolution one.  Without it the
    3D network shipped until 2026-12-01 (trained on 512-pixel slices read at 128) shrank the lungs of
    the one coarse HU CT here by about a pixel all round (cip_ct64, 64 x 64 pixels of 4.2 mm, read
    at 128: lung Dice 0.937, false negatives 11x its false positives); cip_ct64 informed this, so
    its later figures are not blind."""
    spec = get_network(network)
    return list(AUGMENT_2D) if spec.dims == 2 else list(spec.recipe.augmentation) + ["lowres"]


def sources(root: Path = DATA_ROOT) -> list:
    return [str(root / "covid19ctseg_dstaroff"), f"{root / INFNET},labels=infection,weight=0.2",
            "phantom,cases=12,healthy=5,weight=0.15"]


# What the 2-core CPU forces (each entry is a deviation from the paper recipe, reported in the card)
CPU_BUDGET = {
    "unet": {"crop_size": [192, 192], "epochs": 20},
    "ms_unet": {"crop_size": [160, 160], "epochs": 16},
    # the paper's RMSProp (lr 1e-3, here with torch's momentum 0.9) learnt no infection at all in its first 2
    # epochs on these data (validation infection Dice 0.000 twice, lung 0.77); Adam, as every other run here
    # msa_cpp_unet and chs_net: planned for 12 epochs, cut to 9 and 8 while running (after epochs 3 and 2) so
    # that their poly schedules end within the CPU time left; the poly factor jumps once at the cut
    "msa_cpp_unet": {"crop_size": [160, 160], "epochs": 9, "schedule": "poly", "optimizer": "adam"},
    "chs_net": {"crop_size": [160, 160], "epochs": 8},
    # qchc_unet3d: 16 epochs planned; its plateau schedule never lowered the rate, so it was continued to 24
    "qchc_unet3d": {"input_size": [16, 128, 128], "inplane_size": [128, 128], "lr": 1e-3, "epochs": 24,
                    "samples_per_epoch": 160},
}
# What a run on a lent GPU changes from the paper recipe.  Such a machine is lent for minutes, not hours,
# so every network gets the same wall-clock budget (--time-budget) and the trainer re-fits its planned
# epochs to it after every epoch; the networks keep the shipped widths, so the CPU inference
# measured in benchmarks/results/speed.md stays what ships.
# The 2D recipes' 70-100 epochs of 900 slices take a few minutes there: 400 are planned, so every run
# uses the whole budget and its schedule ends with it (best.pt is still chosen on validation).
GPU_BUDGET = {
    "unet": {"epochs": 400},
    "ms_unet": {"epochs": 400},
    # the CPU run's reason (RMSProp learnt no infection in its first epochs here) holds in a short run too
    "msa_cpp_unet": {"schedule": "poly", "optimizer": "adam", "epochs": 400},
    "chs_net": {"epochs": 400},
    # the paper's 80 x 160 x 160 patches and 300 plateau epochs do not fit minutes; the shipped inference
    # patch stays 16 x 128 x 128, and a poly schedule ends within the budget where a plateau one would not
    "qchc_unet3d": {"input_size": [16, 128, 128], "inplane_size": [128, 128], "lr": 1e-3, "schedule": "poly"},
}
# how (not what) a GPU run trains: validation every 4th epoch, loader workers beside the GPU (a 3D patch
# takes ~22 ms to draw and augment on one core, a 2D slice ~3 ms)
GPU_SETTINGS = {"val_every": 4, "threads": 2}
GPU_LOADER_WORKERS = {2: 2, 3: 4}
RECIPES = {"cpu": CPU_BUDGET, "gpu": GPU_BUDGET, "full": {}}
# How a CT in HU becomes 8-bit.  The runs started with "recipe" (per slice min-max + CLAHE, as the
# COVID-19-CT-Seg PNGs were made).  CLAHE adapts to each slice's content and resolution: on the one
# real HU CT here (cip_ct64, 4 mm pixels) it turned smooth parenchyma into blotches and a network
# called 42 % of a lung without infection "infection" (0.5 % through the lung window).  A fixed
# window maps the same HU to the same grey value at any resolution and commutes with the
# low-resolution augmentation, so every run switched to it mid-training (the epoch is in the card).
# cip_ct64 informed this choice, so its figures are not blind.
HU_MAPPING = "lung_window"
# Choices that are not CPU economies but readings for these data (also in the card)
DATA_CHOICES = {"net_kwargs_shipped": True, "samples_per_epoch": 900, "phantom_shape": [32, 256, 256],
                "hu_to_display8": HU_MAPPING}


def run_folder(network: str, recipe: str = "cpu", from_shipped: str = None) -> Path:
    """benchmarks/runs/real[_RECIPE][_LEG]/NETWORK (LEG: the name of a leg fine-tuned from the shipped weights)."""
    name = "real" + ("" if recipe == "cpu" else f"_{recipe}") + (f"_{from_shipped}" if from_shipped else "")
    return RUNS.with_name(name) / network


def run_config(network: str, recipe: str = "cpu", device: str = "auto", threads: int = 1, out: Path = None,
               time_budget: float = None, max_steps_per_epoch: int = None, from_shipped: str = None,
               lr: float = None):
    values = {"network": network, "data": sources(), "split_file": str(SPLIT_PATH), "device": device,
              "out": str(out or run_folder(network, recipe, from_shipped)), **DATA_CHOICES}
    spec = get_network(network)
    values["augmentation"] = augmentation_for(network)
    values.update(RECIPES[recipe].get(network, {}))
    if recipe == "cpu":
        values["threads"] = threads
    elif recipe == "gpu":
        values.update(GPU_SETTINGS, time_budget_minutes=time_budget, num_workers=GPU_LOADER_WORKERS[spec.dims])
        if device == "cpu":  # the recipe on the CPU: the cores compute, and loader workers would only compete
            values.update(threads=threads, num_workers=0)
    values["max_steps_per_epoch"] = max_steps_per_epoch
    if lr is not None:  # e.g. a fine-tuning leg at a fraction of the recipe's rate
        values["lr"] = float(lr)
    last = Path(values["out"]) / "last.pt"
    values["resume"] = str(last) if last.exists() else None
    # a restart continues the run; only its first start reads the shipped weights
    values["init_from"] = "shipped" if from_shipped and not last.exists() else None
    return build_config(None, **values)


def wall_minutes(epoch_records) -> float:
    """Total training time of a run (every epoch of every resumed invocation)."""
    return round(sum(float(r.get("seconds") or 0.0) for r in epoch_records) / 60.0, 1)


def mapping_switch_epoch(start_records):
    """The epoch after which the run resumed with the current ``HU_MAPPING`` (None: it used it from the start)."""
    for record in start_records:
        if (record.get("config") or {}).get("hu_to_display8") == HU_MAPPING:
            return record.get("resumed_from_epoch") or None
    return None


def export_source(network: str, run: Path):
    """best.pt, unless it predates the switch to ``HU_MAPPING`` (then last.pt, which maps HU as shipped)."""
    best = load_checkpoint(run / "best.pt", expected_network=network)
    if best.preprocessing.hu_to_display8 == HU_TO_DISPLAY8[HU_MAPPING].to_dict():
        return best
    return load_checkpoint(run / "last.pt", expected_network=network)


def export(network: str, run: Path, recipe: str = "cpu", runs_sharing_gpu: int = None) -> Path:
    """The run's best checkpoint (with the shipped HU mapping) as the package's float16 weights for
    ``network``, with what a model card needs: total training time, device, deviations from the paper."""
    loaded = export_source(network, run)
    raw = loaded.raw
    training = dict(raw.get("training") or {})
    log = MetricsLog(run)
    epochs = log.records("epoch")
    training["hu_mapping_switched_after_epoch"] = mapping_switch_epoch(log.records("start"))
    training["wall_minutes"] = wall_minutes(epochs)
    # the run's plan as it ended (config.json) and how far it went, not the exported checkpoint's own
    training["epochs_planned"] = json.loads((run / "config.json").read_text()).get("epochs")
    training["epochs_trained"] = len(epochs)
    training["deviations_from_paper"] = dict(RECIPES[recipe].get(network, {}))
    if (training.get("recipe") or {}).get("lr") not in (None, get_network(network).recipe.lr):
        training["deviations_from_paper"]["lr"] = training["recipe"]["lr"]  # set by --lr
    # the folder the run read (a copy on a lent machine) by the name it has here
    training["data"] = [str(d).replace(str(DATA_ROOT), "../shared/data") for d in (training.get("data") or [])]
    training["run_recipe"] = recipe  # cpu | gpu | full (training["recipe"] holds the run's hyper-parameters)
    if runs_sharing_gpu:
        training["runs_sharing_gpu"] = int(runs_sharing_gpu)
    budget = log.records("budget")
    if budget:
        training["time_budget_minutes"] = budget[-1].get("budget_minutes")
    training["data_choices"] = {"augmentation": (training.get("recipe") or {}).get("augmentation"), **DATA_CHOICES}
    path = WEIGHTS_DIR / f"{network}.pt"
    save_checkpoint(path, loaded.model, network, loaded.network_kwargs, loaded.preprocessing,
                    training=training, metrics=raw.get("metrics"), half=True)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", required=True, choices=network_names())
    parser.add_argument("--export", action="store_true", help="write the best checkpoint as the package weights")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                        help="cpu: CPU_BUDGET (hours on 2 cores); gpu: GPU_BUDGET fitted to --time-budget; full: the papers'")
    parser.add_argument("--time-budget", type=float, default=7.0, help="gpu recipe: wall-clock minutes for the epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs-sharing-gpu", type=int, help="--export: how many runs trained at once on the GPU")
    parser.add_argument("--from-shipped", nargs="?", const="ft", metavar="LEG",
                        help="fine-tune the shipped weights instead of training from scratch, in run folder "
                             "real_RECIPE_LEG (default LEG: ft)")
    parser.add_argument("--lr", type=float, help="learning rate instead of the recipe's (e.g. for a fine-tuning leg)")
    parser.add_argument("--max-steps-per-epoch", type=int, help="a smoke test of the whole chain (not for weights)")
    args = parser.parse_args(argv)
    run = args.out or run_folder(args.network, args.recipe, args.from_shipped)
    if args.export:
        print(f"wrote {export(args.network, run, args.recipe, args.runs_sharing_gpu)}")
        return 0
    if not SPLIT_PATH.exists():
        raise SystemExit(f"{SPLIT_PATH} is missing: run python -m benchmarks.real_data_split")
    cfg = run_config(args.network, args.recipe, args.device, args.threads, run, args.time_budget,
                     args.max_steps_per_epoch, args.from_shipped, args.lr)
    code, status = run_training(cfg, echo=lambda text: print(text, flush=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
