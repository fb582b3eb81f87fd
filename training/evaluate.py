"""Whole-volume evaluation of a checkpoint: ``metrics.csv`` (one row per case and class, plus the
mean) and ``metrics.md``, with every metric of :func:`napari_covidseg.metrics.all_metrics`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Optional

import numpy as np

from napari_covidseg.checkpoint import load_checkpoint
from napari_covidseg.errors import DataFolderError
from napari_covidseg.inference import segment_volume
from napari_covidseg.metrics import all_metrics
from napari_covidseg.models.registry import CLASS_NAMES

from .datasets import Case, load_sources
from .splits import read_split

METRIC_COLUMNS = ("dice", "iou", "sensitivity", "specificity", "precision", "f_measure", "hd95_mm", "mae")
CSV_COLUMNS = ("case", "class") + METRIC_COLUMNS


def select_cases(cases: List[Case], split_path: Optional[str], subset: str) -> List[Case]:
    if not split_path or subset == "all":
        return cases
    split = read_split(split_path)
    if subset not in ("train", "val", "test"):
        raise DataFolderError(f"unknown subset {subset!r}; use train, val, test or all")
    wanted = split.get(subset) or []
    if not wanted:
        raise DataFolderError(f"the split {split_path} has no {subset} cases; choose another --subset")
    by_id = {c.case_id: c for c in cases}
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise DataFolderError(f"the split names {subset} cases that are not in the data: {', '.join(missing[:5])}")
    return [by_id[w] for w in wanted]


def evaluate_cases(loaded, cases: List[Case], device="auto", threshold: float = 0.5, progress=None) -> List[dict]:
    rows = []
    for k, case in enumerate(cases):
        result = segment_volume(loaded, case.ct, case.spacing, threshold=threshold, device=device, domain=case.domain,
                                probabilities=True, probability_dtype="float32")
        for c, name in enumerate(CLASS_NAMES):
            gt = case.lung if c == 0 else case.infection
            if gt is None:
                continue
            pred = result.lung if c == 0 else result.infection
            m = all_metrics(pred, gt, spacing=case.spacing, prob=result.probabilities[c])
            rows.append({"case": case.case_id, "class": name, **m})
        if progress:
            progress(k + 1, len(cases))
    return rows


def mean_rows(rows: List[dict]) -> List[dict]:
    out = []
    for name in CLASS_NAMES:
        items = [r for r in rows if r["class"] == name]
        if not items:
            continue
        mean = {"case": "mean", "class": name}
        for key in METRIC_COLUMNS:
            vals = [r[key] for r in items if r[key] is not None and math.isfinite(r[key])]
            mean[key] = float(np.mean(vals)) if vals else float("nan")
        out.append(mean)
    return out


def write_tables(rows: List[dict], out_dir, title: str = "") -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows = rows + mean_rows(rows)
    with open(out_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in all_rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    lines = [f"# {title}" if title else "# Evaluation", "",
             "| case | class | Dice | IoU | Sensitivity | Specificity | Precision | F-measure | HD95 (mm) | MAE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        cells = [("**mean**" if r["case"] == "mean" else r["case"]), r["class"]]
        cells += [("n/a" if not math.isfinite(r[k]) else (f"{r[k]:.2f}" if k == "hd95_mm" else f"{r[k]:.4f}")) for k in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "metrics.md").write_text("\n".join(lines) + "\n")
    return {"csv": str(out_dir / "metrics.csv"), "md": str(out_dir / "metrics.md"), "mean": mean_rows(rows)}


def evaluate(checkpoint: str, data: str, out_dir: str, layout: str = "auto", split: Optional[str] = None,
             subset: str = "all", device: str = "auto", threshold: float = 0.5, phantom_cases: int = 8,
             phantom_shape=(32, 192, 192)) -> dict:
    loaded = load_checkpoint(checkpoint, map_location="cpu")
    if isinstance(data, str) and layout != "auto":
        data = f"{data},layout={layout}"
    _, _, cases = load_sources(data, phantom_cases, phantom_shape)
    chosen = select_cases(cases, split, subset)
    rows = evaluate_cases(loaded, chosen, device=device, threshold=threshold)
    title = f"{loaded.network} ({Path(checkpoint).name}) on {data if isinstance(data, str) else ' + '.join(data)}, {subset} ({len(chosen)} cases)"
    return {**write_tables(rows, out_dir, title), "rows": rows, "n_cases": len(chosen)}
