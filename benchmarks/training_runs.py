"""Every training run of the shipped networks side by side, and which one ships.

    python -m benchmarks.training_runs     # reads benchmarks/runs/real*/NET/metrics.jsonl

Writes ``benchmarks/results/training_runs.md``.  The run folders are not in git (checkpoints), so
this table is what stays of them.  The rule for what ships, fixed before the held-out test figures
were computed: per network, the run whose best validated epoch has the highest validation mean Dice
(the validation cases of ``real_data_split.json``; the held-out test cases choose nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from napari_covidseg.models.registry import network_names

from training.metrics_log import MetricsLog

from .train_real_weights import wall_minutes

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
RESULTS = HERE / "results" / "training_runs.md"
# run folder -> how it was trained (benchmarks/train_real_weights.py: --recipe cpu | gpu [--from-shipped])
FOLDERS = {
    "real": "CPU, 1 thread per run, 5 runs sharing 2 cores (CPU_BUDGET)",
    "real_gpu_run1": "GPU recipe, 7.5 min budget fitted after the first epoch only (5 runs on one H200)",
    "real_gpu": "GPU recipe, 5.5 min budget re-fitted after every epoch (5 runs on one H200)",
    "real_gpu_ft": "GPU recipe fine-tuned from the weights shipped before it (`--from-shipped`: real_gpu's, "
                   "qchc_unet3d real_gpu_run1's), a warm restart of the same schedule, 7.0 min budget re-fitted after "
                   "every epoch (5 runs on one H200)",
    "real_gpu_ft2": "GPU recipe, a third leg fine-tuned from real_gpu_ft's weights for the two networks whose "
                    "validation score that leg had raised (ms_unet, msa_cpp_unet; unet's had not moved, 0.892 -> 0.891), "
                    "3.6 min budget re-fitted after every epoch (2 runs on one H200)",
    "real_cpu_ft": "GPU recipe (full-size slices, 900 per epoch) run on the 2-core CPU while no GPU was lent, "
                   "fine-tuned from the shipped weights at lr 2e-4 (a fifth of the recipe's; `--lr`), poly schedule, "
                   "budget re-fitted after every epoch, 2 threads: msa_cpp_unet (the paper network closest to the "
                   "U-Net on held-out infection; from real_gpu_ft2, 100 min), then in a later session chs_net (the "
                   "least trained network: 6 epochs on the GPU, its validation score still rising; from real_gpu, "
                   "75 min) and qchc_unet3d (the lowest validation score; from real_gpu_run1, lr 1e-4, a tenth of "
                   "the recipe's, 85 min); in a third session ms_unet (its validation score had risen with each GPU leg; "
                   "from real_gpu_ft2, 110 min, 1 thread and no loader workers while the other core served other work)",
    "real_cpu_ft2": "a second CPU leg as real_cpu_ft, one thread per run, two runs side by side: chs_net (its "
                    "validation score had still risen in its last epoch of real_cpu_ft; from real_cpu_ft, lr 2e-4, "
                    "125 min) and qchc_unet3d with the low-resolution transform added to its augmentation (it had "
                    "shrunk cip_ct64's blurred lungs; from real_gpu_run1, lr 5e-5, 80 min)",
}


def summarize(folder: Path) -> Optional[dict]:
    """Epochs, training minutes and the best validated epoch of one run folder (None if absent)."""
    if not (folder / "metrics.jsonl").is_file():
        return None
    epochs = MetricsLog(folder).records("epoch")
    validated = [r for r in epochs if r.get("val_dice_mean") is not None]
    if not validated:
        return None
    best = max(validated, key=lambda r: r["val_dice_mean"])
    val = best.get("val") or {}
    return {"epochs": len(epochs), "minutes": wall_minutes(epochs),
            "best_epoch": best["epoch"], "val_dice_mean": best["val_dice_mean"],
            "val_lung": (val.get("lung") or {}).get("dice"), "val_infection": (val.get("infection") or {}).get("dice"),
            "device": best.get("device")}


def collect(runs: Path = RUNS) -> Dict[str, Dict[str, dict]]:
    return {net: {name: s for name in FOLDERS if (s := summarize(runs / name / net))} for net in network_names()}


def chosen(by_run: Dict[str, dict]) -> Optional[str]:
    return max(by_run, key=lambda name: by_run[name]["val_dice_mean"]) if by_run else None


def report(table: Dict[str, Dict[str, dict]]) -> List[str]:
    f = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["# Training runs of the shipped networks (`python -m benchmarks.training_runs`)", "",
             "Validation figures (validation cases of `benchmarks/real_data_split.json`: 2 COVID-19-CT-Seg groups, "
             "5 Inf-Net slices, 2 phantoms) at each run's best validated epoch. Per network the run with the "
             "highest validation mean Dice ships (**bold**); held-out test figures are in `real_data.md` and chose "
             "nothing. Minutes: training epochs only (validation and start-up not counted).", "",
             "| network | run | epochs | minutes | best epoch | val mean Dice | val lung Dice | val infection Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for net, by_run in table.items():
        pick = chosen(by_run)
        for name, s in by_run.items():
            mark = "**" if name == pick else ""
            lines.append(f"| `{net}` | {mark}{name}{mark} | {s['epochs']} | {s['minutes']} | {s['best_epoch']} | "
                         f"{mark}{f(s['val_dice_mean'])}{mark} | {f(s['val_lung'])} | {f(s['val_infection'])} |")
    lines += ["", "Runs:"] + [f"- `{name}`: {text}." for name, text in FOLDERS.items()]
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.write_text("\n".join(report(collect())))
    print(json.dumps({net: chosen(by_run) for net, by_run in collect().items()}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
