"""Prediction-vs-ground-truth overlay, per-slice metrics and worst-slice ranking (pure numpy).

The Compare widget shows where a prediction agrees with the ground truth as one Labels layer:
1 = true positive (green), 2 = false negative (red: missed), 3 = false positive (yellow: extra).
The colours are fixed (not napari's random label colours) so that a screenshot means the same
thing to every reader.  Any non-zero voxel counts as foreground in both masks, so a lung mask
with 1 = left and 2 = right lung compares as one lung.

The metric formulas live in :mod:`napari_covidseg.metrics` (shared with training, so the GUI and
the training log can never disagree); this module only applies them slice by slice, ranks
slices and writes the CSV report.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from . import metrics
from .errors import InputError

BACKGROUND, TRUE_POSITIVE, FALSE_NEGATIVE, FALSE_POSITIVE = 0, 1, 2, 3
OVERLAY_RGB = {
    TRUE_POSITIVE: (0, 255, 0),
    FALSE_NEGATIVE: (255, 0, 0),
    FALSE_POSITIVE: (255, 255, 0),
}
OVERLAY_NAMES = {
    TRUE_POSITIVE: "true positive",
    FALSE_NEGATIVE: "false negative (missed)",
    FALSE_POSITIVE: "false positive (extra)",
}
# Metrics shown for a slice and for the volume, in table order: (key, label).
METRIC_COLUMNS = (
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("precision", "Precision"),
    ("hd95_mm", "HD95 (mm)"),
)
_RATIO_KEYS = tuple(key for key, _ in METRIC_COLUMNS if key != "hd95_mm")
#: overlay value of each (prediction + 2 x ground truth) code: 0 none, 1 only predicted, 2 only true, 3 both
_CODE_TO_OVERLAY = np.array([BACKGROUND, FALSE_POSITIVE, FALSE_NEGATIVE, TRUE_POSITIVE], dtype=np.uint8)


def overlay_color_dict() -> Dict[Optional[int], tuple]:
    """RGBA (0-1 floats) per overlay value, background transparent: for DirectLabelColormap."""
    colors: Dict[Optional[int], tuple] = {None: (0.0, 0.0, 0.0, 0.0), BACKGROUND: (0.0, 0.0, 0.0, 0.0)}
    for value, rgb in OVERLAY_RGB.items():
        colors[value] = tuple(c / 255.0 for c in rgb) + (1.0,)
    return colors


def check_same_shape(pred: np.ndarray, gt: np.ndarray, pred_name: str = "prediction", gt_name: str = "ground truth"):
    """Raise :class:`InputError` unless the two masks have the same shape."""
    if np.shape(pred) != np.shape(gt):
        raise InputError(
            f"'{pred_name}' has shape {np.shape(pred)} but '{gt_name}' has shape {np.shape(gt)}: "
            "compare a prediction with the ground truth of the same CT."
        )


@dataclass(frozen=True)
class Comparison:
    """A prediction against its ground truth, counted once: the overlay and the confusion counts
    of every slice (axis 0), from which every ratio of the slices and the volume follows."""

    overlay: np.ndarray  # uint8: TRUE_POSITIVE / FALSE_NEGATIVE / FALSE_POSITIVE / BACKGROUND
    counts: np.ndarray  # (slices, 4) int64: TP, FP, FN, TN per slice

    def volume_counts(self) -> Tuple[int, int, int, int]:
        return tuple(int(v) for v in self.counts.sum(axis=0))

    def slice_dice(self) -> np.ndarray:
        return metrics.per_slice_dice(None, None, counts=self.counts)

    def both_present(self) -> bool:
        """Both masks hold foreground somewhere (HD95 is defined)."""
        tp, fp, fn, _ = self.volume_counts()
        return tp + fp > 0 and tp + fn > 0

    def volume_metrics(self) -> Dict[str, float]:
        """The ratio metrics of the volume (NaN where both masks are empty, as :func:`region_metrics`)."""
        return _ratios(self.volume_counts())


def compare_masks(pred: np.ndarray, gt: np.ndarray) -> Comparison:
    """Overlay and per-slice confusion counts in one pass over the slices (any non-zero voxel is
    foreground; a 2D pair is one slice)."""
    check_same_shape(pred, gt)
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.ndim < 3:
        p, g = p[None], g[None]
    overlay = np.empty(p.shape, dtype=np.uint8)
    counts = np.empty((p.shape[0], 4), dtype=np.int64)
    size = int(np.prod(p.shape[1:]))
    for z in range(p.shape[0]):
        pz, gz = p[z].view(np.uint8), g[z].view(np.uint8)
        code = (gz << 1) | pz
        np.take(_CODE_TO_OVERLAY, code, out=overlay[z])
        tp, n_pred, n_gt = np.count_nonzero(code == 3), np.count_nonzero(pz), np.count_nonzero(gz)
        counts[z] = tp, n_pred - tp, n_gt - tp, size - n_pred - n_gt + tp
    return Comparison(overlay.reshape(np.shape(pred)), counts)


def overlay_labels(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """uint8 array: 1 where both are foreground, 2 where only ``gt`` is, 3 where only ``pred`` is."""
    return compare_masks(pred, gt).overlay


def _finite_or_nan(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def _ratios(counts: Tuple[int, int, int, int]) -> Dict[str, float]:
    """The table's ratio metrics of one set of counts; NaN for all when both masks are empty."""
    tp, fp, fn, _ = counts
    if tp + fp + fn == 0:
        return {k: float("nan") for k in _RATIO_KEYS}
    ratios = metrics.ratios_from_counts(*counts)
    return {k: ratios[k] for k in _RATIO_KEYS}


def region_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], with_hd95: bool = True) -> Dict[str, float]:
    """Dice, IoU, sensitivity, specificity, precision and (optionally) HD95 in mm of one region.

    ``pred`` and ``gt`` are a slice (2D, spacing (y, x)) or a volume (3D, spacing (z, y, x)).
    When both are empty nothing can be measured and every value is NaN (shown as "n/a"), so an
    empty slice never looks like a perfect or a failed one.  HD95 is NaN when either is empty.
    The voxels are counted once for all the ratios.
    """
    check_same_shape(pred, gt)
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    values = _ratios(metrics.confusion(p, g))
    if with_hd95:
        both = bool(p.any()) and bool(g.any())
        values["hd95_mm"] = _finite_or_nan(metrics.hd95(p, g, tuple(spacing))) if both else float("nan")
    return values


def iter_per_slice_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], with_hd95: bool = False):
    """Generator form of :func:`per_slice_metrics` for a worker thread.

    The ratio metrics come from :func:`napari_covidseg.metrics.per_slice_metrics` (vectorised);
    HD95 needs a distance transform per slice, so it is the slow part: the generator yields
    ``(slices_done, slices_to_do)`` after each slice where both masks hold foreground (a progress
    bar's values, and the points where a cancelled worker stops) and returns the result dict.
    """
    check_same_shape(pred, gt)
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    out = {k: np.asarray(v) for k, v in metrics.per_slice_metrics(p, g).items()}
    if not with_hd95:
        return out
    out["hd95_mm"] = np.full(p.shape[0], np.nan)
    slice_spacing = tuple(spacing)[1:]
    todo = np.flatnonzero((out["gt_voxels"] > 0) & (out["pred_voxels"] > 0))
    for done, z in enumerate(todo, start=1):
        out["hd95_mm"][z] = _finite_or_nan(metrics.hd95(p[z], g[z], slice_spacing))
        yield done, len(todo)
    return out


def per_slice_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], with_hd95: bool = False) -> Dict[str, np.ndarray]:
    """One array per metric, one value per axial slice (axis 0); NaN where both are empty.

    Also holds the voxel counts ``gt_voxels`` and ``pred_voxels`` per slice.  HD95 per slice is
    optional because it needs a distance transform per slice (slow on full-size CT).
    """
    steps = iter_per_slice_metrics(pred, gt, spacing, with_hd95)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def rank_worst_slices(slice_dice: np.ndarray) -> np.ndarray:
    """Slice indices ordered by Dice ascending, skipping NaN (slices empty in both masks).

    Ties keep slice order, so "Next worst" walks equally bad slices from top to bottom.
    """
    slice_dice = np.asarray(slice_dice, dtype=float)
    candidates = np.flatnonzero(~np.isnan(slice_dice))
    order = np.argsort(slice_dice[candidates], kind="stable")
    return candidates[order]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return "" if math.isnan(value) else f"{value:.10g}"


def write_comparison_csv(
    path,
    slice_metrics: Dict[str, np.ndarray],
    volume_metrics: Dict[str, float],
    overwrite: bool = False,
) -> Path:
    """Write per-slice metrics and the whole-volume summary to one CSV file.

    Rows: a header ``slice,<metrics...>,gt_voxels,pred_voxels``, one row per slice (empty cells
    where a metric is undefined), then a ``volume`` row with the whole-volume values: one
    rectangular table that spreadsheets and ``pandas.read_csv`` read as is.
    Refuses to replace an existing file unless ``overwrite`` (the GUI asks first).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another file name (nothing was written).")
    metric_keys = [k for k, _ in METRIC_COLUMNS if k in slice_metrics or k in volume_metrics]
    n = len(slice_metrics["dice"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slice"] + metric_keys + ["gt_voxels", "pred_voxels"])
        for z in range(n):
            row = [z] + [_fmt(slice_metrics[k][z]) if k in slice_metrics else "" for k in metric_keys]
            row += [_fmt(slice_metrics["gt_voxels"][z]), _fmt(slice_metrics["pred_voxels"][z])]
            writer.writerow(row)
        writer.writerow(
            ["volume"]
            + [_fmt(volume_metrics.get(k)) for k in metric_keys]
            + [_fmt(int(np.sum(slice_metrics["gt_voxels"]))), _fmt(int(np.sum(slice_metrics["pred_voxels"])))]
        )
    tmp.replace(path)
    return path
