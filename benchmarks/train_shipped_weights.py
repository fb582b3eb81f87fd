"""Train the small ("shipped") variant of every registered network and write the package weights.

    python -m benchmarks.train_shipped_weights                   # every registered network, one after the other
    python -m benchmarks.train_shipped_weights --network unet    # one network (runs can go in parallel)
    python -m benchmarks.train_shipped_weights --report-only     # rebuild the results tables

For each network: ``spec.shipped_kwargs`` (small widths), trained with ``training`` on phantom CTs
(17 phantoms, seeds 100..116, case-level split 12 train / 3 val / 2 test, fixed seed), the paper's
recipe except where this CPU forces otherwise (fewer epochs sized to a time budget, 2D input
128 x 128, 3D patches at a coarse target spacing; every change is recorded in the results).
The best-validation checkpoint is evaluated on the two held-out test phantoms and on the default
sample phantom (``make_phantom()``, seed 0, (48, 256, 256)) and written with float16 weights to
``napari_covidseg/weights/<network>.pt``.  Results go to ``benchmarks/results/shipped_weights.{json,md}``.

Real data: if ``/work/shared/data`` (``../shared/data``) holds a training folder, pass it with
``--data``; the weights shipped now were trained on phantoms only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_covidseg.checkpoint import WEIGHTS_DIR, load_checkpoint, save_checkpoint
from napari_covidseg.models.registry import get_network, network_names
from napari_covidseg.phantom import make_phantom

from training.config import TrainConfig
from training.datasets import Case, phantom_cases
from training.evaluate import evaluate_cases, mean_rows
from training.splits import write_split
from training.trainer import run_training

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs" / "shipped"
N_PHANTOMS, FIRST_SEED = 17, 100
PHANTOM_SHAPE = (32, 256, 256)
SEED = 0

# what this CPU can afford, per network (recorded in the results next to the paper recipe)
OVERRIDES = {
    "default_2d": {"input_size": [128, 128]},
    # CHS-Net's spectral pooling (FFTs) makes it the slowest 2D network per sample on a CPU
    "chs_net": {"input_size": [96, 96]},
    "qchc_unet3d": {"input_size": [32, 96, 96], "target_spacing": [7.5, 3.0, 3.0], "lr": 1e-3, "batch_size": 2},
}


def make_split(ids):
    rng = np.random.default_rng(SEED)
    order = [ids[i] for i in rng.permutation(len(ids))]
    return {"train": sorted(order[5:]), "val": sorted(order[2:5]), "test": sorted(order[:2]), "seed": SEED,
            "method": "fixed 12/3/2 phantom split"}


def probe_seconds_per_sample(cfg: TrainConfig) -> float:
    """Wall time of one training sample (forward + backward) at this config, measured now."""
    spec = get_network(cfg.network)
    model = spec.create(**cfg.network_kwargs)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = spec.loss(**(cfg.loss_kwargs or {}))
    b = int(cfg.batch_size)
    x = torch.rand((b, 1, *cfg.input_size))
    y = (torch.rand((b, 2, *cfg.input_size)) > 0.5).float()
    times = []
    for _ in range(3):
        t = time.time()
        opt.zero_grad()
        loss, _ = loss_fn(model(x), y, 0.5)
        loss.backward()
        opt.step()
        times.append(time.time() - t)
    return min(times[1:]) / b


def train_one(name: str, minutes: float, data: str, continue_previous: bool = False) -> dict:
    spec = get_network(name)
    out = RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"phantom_{s:03d}" for s in range(FIRST_SEED, FIRST_SEED + N_PHANTOMS)]
    split = make_split(ids)
    write_split(split, out / "fixed_split.json")
    overrides = dict(OVERRIDES.get(name, OVERRIDES["default_2d"] if spec.dims == 2 else {}))
    cfg = TrainConfig(network=name, data="phantom", out=str(out), net_kwargs_shipped=True, seed=SEED, threads=1,
                      device="cpu", split_file=str(out / "fixed_split.json"), **overrides)
    cfg.resolve()
    cases = phantom_cases(N_PHANTOMS, PHANTOM_SHAPE, first_seed=FIRST_SEED)
    by_id = {c.case_id: c for c in cases}
    samples = 192 if spec.dims == 2 else 24
    per_sample = probe_seconds_per_sample(cfg)
    val_seconds = 3 * (PHANTOM_SHAPE[0] if spec.dims == 2 else 4) * per_sample / 2.5
    epochs = int(max(3, min(spec.recipe.epochs, (minutes * 60) / (samples * per_sample + val_seconds))))
    cfg.epochs, cfg.samples_per_epoch = epochs, samples
    print(f"{name}: {per_sample:.3f} s/sample -> {epochs} epochs of {samples} samples", flush=True)

    previous = None
    if continue_previous and (out / "best.pt").exists() and (RESULTS / f"shipped_{name}.json").exists():
        # warm restart: a second, separately scheduled run from the first run's best weights
        (out / "best.pt").replace(out / "previous_best.pt")
        cfg.init_from = str(out / "previous_best.pt")
        previous = json.loads((RESULTS / f"shipped_{name}.json").read_text())
    t0 = time.time()
    for f in ("last.pt", "best.pt", "metrics.jsonl", "train.log"):
        (out / f).unlink(missing_ok=True)
    code, status = run_training(cfg, echo=lambda s: print(f"[{name}] {s}", flush=True), cases=cases)
    seconds = time.time() - t0
    if code != 0 or status != "finished":
        raise SystemExit(f"{name}: training did not finish ({status}); see {out / 'train.log'}")
    best = load_checkpoint(out / "best.pt", expected_network=name)
    # evaluate the float16 weights that actually ship, not the float32 training checkpoint
    save_checkpoint(out / "best_half.pt", best.model, name, best.network_kwargs, best.preprocessing,
                    training=best.training, metrics=best.metrics, half=True)
    loaded = load_checkpoint(out / "best_half.pt", expected_network=name)
    test_rows = evaluate_cases(loaded, [by_id[i] for i in split["test"]], device="cpu")
    sample = make_phantom()
    sample_case = Case("sample_phantom", sample.ct, sample.lung, sample.infection, tuple(sample.spacing))
    sample_rows = evaluate_cases(loaded, [sample_case], device="cpu")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    epochs_done = int(loaded.training.get("epochs_done", 0))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_records = [r for r in log if r.get("event") == "epoch"]
    result = {
        "network": name, "title": spec.title, "paper": spec.paper, "dims": spec.dims,
        "network_kwargs": dict(cfg.network_kwargs), "parameters": n_params,
        "data": f"phantom: {N_PHANTOMS} cases, seeds {FIRST_SEED}..{FIRST_SEED + N_PHANTOMS - 1}, shape {list(PHANTOM_SHAPE)}",
        "split": {k: split[k] for k in ("train", "val", "test")},
        "continued_from_previous_run": bool(previous),
        "recipe": {k: getattr(cfg, k) for k in ("optimizer", "lr", "weight_decay", "schedule", "epochs", "batch_size",
                                                "input_size", "augmentation", "samples_per_epoch", "target_spacing")},
        "paper_recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(spec.recipe).items() if k != "extra"},
        "changes_from_paper": overrides | {"epochs": epochs, "samples_per_epoch": samples},
        "preprocessing": loaded.preprocessing.to_dict(),
        "best_epoch": epochs_done + (previous["epochs_run"] if previous else 0),
        "epochs_run": len(epoch_records) + (previous["epochs_run"] if previous else 0),
        "train_seconds": round(seconds + (previous["train_seconds"] if previous else 0.0), 1),
        "runs": (previous.get("runs", [previous["recipe"]]) if previous else []) + [dict(cfg.to_dict(), epochs=epochs)],
        "final_val_dice_mean": epoch_records[-1]["val_dice_mean"] if epoch_records else None,
        "test": mean_rows(test_rows), "test_per_case": test_rows, "sample_phantom": sample_rows,
        "device": "cpu (2 shared cores, 1 torch thread)", "evaluated_weights": "float16 (as shipped)",
    }
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    training_info = dict(loaded.training)
    training_info.update({"data": result["data"], "note": "trained on synthetic phantoms only, see benchmarks/results/shipped_weights.md"})
    metrics = {"test": {r["class"]: {k: r[k] for k in ("dice", "iou", "sensitivity", "specificity", "hd95_mm")} for r in result["test"]},
               "sample_phantom": {r["class"]: {k: r[k] for k in ("dice", "iou", "hd95_mm")} for r in sample_rows},
               "val_dice_mean": loaded.metrics.get("val_dice_mean")}
    save_checkpoint(WEIGHTS_DIR / f"{name}.pt", loaded.model, name, loaded.network_kwargs, loaded.preprocessing,
                    training=training_info, metrics=metrics, half=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"shipped_{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def _fmt(v, digits=3):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def report() -> None:
    results = []
    for name in network_names():
        p = RESULTS / f"shipped_{name}.json"
        if p.exists():
            results.append(json.loads(p.read_text()))
    (RESULTS / "shipped_weights.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Shipped weights", "",
             "Small variants (`shipped_kwargs`) trained by `python -m benchmarks.train_shipped_weights` on synthetic phantoms "
             "only (no real CT was available on the build machine: `/work/shared/data` does not exist), CPU, 2 shared cores. "
             "They demonstrate the pipeline and segment the sample phantom; they are **not** validated on patient CT.", "",
             "Test = 2 held-out phantoms (32 x 256 x 256); sample = `make_phantom()` default (48 x 256 x 256, seed 0, not in training).", "",
             "| network | params | epochs | train time | test lung Dice | test inf. Dice | test inf. IoU | test inf. Sen | test inf. Spec | test inf. HD95 mm | sample lung Dice | sample inf. Dice |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = {m["class"]: m for m in r["test"]}
        s = {m["class"]: m for m in r["sample_phantom"]}
        lines.append(f"| {r['network']} | {r['parameters']:,} | {r['epochs_run']} (best {r['best_epoch']}) | {r['train_seconds'] / 60:.1f} min | "
                     f"{_fmt(t['lung']['dice'])} | {_fmt(t['infection']['dice'])} | {_fmt(t['infection']['iou'])} | "
                     f"{_fmt(t['infection']['sensitivity'])} | {_fmt(t['infection']['specificity'], 4)} | {_fmt(t['infection']['hd95_mm'], 1)} | "
                     f"{_fmt(s['lung']['dice'])} | {_fmt(s['infection']['dice'])} |")
    lines += ["", "## Per network", ""]
    for r in results:
        lines += [f"### {r['network']} — {r['title']}", "", f"- paper: {r['paper']}", f"- constructor: `{json.dumps(r['network_kwargs'])}`, "
                  f"{r['parameters']:,} parameters", f"- data: {r['data']}", f"- split: train {', '.join(r['split']['train'])}; "
                  f"val {', '.join(r['split']['val'])}; test {', '.join(r['split']['test'])}",
                  f"- recipe used: `{json.dumps(r['recipe'])}`", f"- changed from the paper recipe (CPU budget): `{json.dumps(r['changes_from_paper'])}`",
                  f"- preprocessing stored in the checkpoint: `{json.dumps(r['preprocessing'])}`",
                  f"- {r['epochs_run']} epochs in {r['train_seconds'] / 60:.1f} min on {r['device']}; best validation epoch {r['best_epoch']}"
                  + (f" ({len(r['runs'])} runs: warm restarts from the previous run's best weights, each with a fresh schedule)"
                     if r.get("runs") else ""), "",
                  "| set | class | Dice | IoU | Sensitivity | Specificity | HD95 mm |", "|---|---|---|---|---|---|---|"]
        for label, rows in (("test (mean of 2)", r["test"]), ("sample phantom", r["sample_phantom"])):
            for m in rows:
                lines.append(f"| {label} | {m['class']} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | {_fmt(m['sensitivity'])} | "
                             f"{_fmt(m['specificity'], 4)} | {_fmt(m['hd95_mm'], 1)} |")
        lines.append("")
    (RESULTS / "shipped_weights.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", action="append", help="network(s) to train (default: all registered)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget per network")
    parser.add_argument("--data", default="phantom")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--continue", dest="continue_previous", action="store_true",
                        help="start from the previous run's best weights (a warm restart with a fresh schedule)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.data != "phantom":
        raise SystemExit("only phantom training is implemented in this script; train real data with `python -m training train`")
    if not args.report_only:
        for name in args.network or network_names():
            train_one(name, args.minutes, args.data, args.continue_previous)
            report()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
