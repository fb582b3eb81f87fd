"""The Compare widget's numbers, off the GUI thread (no Qt here).

``volume_comparison`` is a generator for a napari worker: it yields the fast whole-volume
results (overlay, per-slice Dice, ratio metrics) and then returns the slow one (HD95), so the
table fills at once and HD95 follows.  ``comparison_report`` yields per-slice HD95 progress for
the CSV export.  The formulas live in :mod:`napari_covidseg.metrics` and :mod:`..overlay`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import numpy as np

from .. import metrics
from ..errors import CancelledError
from ..overlay import compare_masks, iter_per_slice_metrics


def format_metric(key: str, value) -> str:
    """Table text: 3 decimals for ratios, 0.1 mm for HD95, 'n/a' for undefined."""
    if value is None:
        return "computing..."
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if key == "hd95_mm" else f"{value:.3f}"


@dataclass(frozen=True)
class VolumeResult:
    """What the widget shows of a whole-volume comparison, all computed off the GUI thread."""

    overlay: np.ndarray
    slice_dice: np.ndarray
    ratios: Dict[str, float]
    both_present: bool  # both masks hold foreground: HD95 is defined (and on its way)


def volume_comparison_fast(p: np.ndarray, g: np.ndarray, spacing=None) -> VolumeResult:
    """Overlay, per-slice Dice and volume ratio metrics of two masks, from one count of the voxels."""
    comparison = compare_masks(p, g)
    return VolumeResult(comparison.overlay, np.asarray(comparison.slice_dice(), dtype=float),
                        comparison.volume_metrics(), comparison.both_present())


def volume_comparison(pred: np.ndarray, gt: np.ndarray, spacing):
    """Generator for a worker: yields the :class:`VolumeResult`, then returns the volume HD95 (mm).

    Takes the layers' arrays as they are (no copy in the GUI thread); a brush stroke landing
    while this runs makes the result stale, and the widget then runs it again.
    """
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    fast = volume_comparison_fast(p, g, spacing)
    yield fast
    return float(metrics.hd95(p, g, spacing)) if fast.both_present else float("nan")


def comparison_report(p: np.ndarray, g: np.ndarray, spacing, volume_metrics: Dict):
    """Generator for the CSV export: yields per-slice HD95 progress, returns (slices, volume)."""
    slices = yield from iter_per_slice_metrics(p, g, spacing, with_hd95=True)
    volume = dict(volume_metrics)
    if volume.get("hd95_mm") is None:  # the volume HD95 worker has not finished yet
        volume["hd95_mm"] = float(metrics.hd95(p, g, spacing)) if (p.any() and g.any()) else float("nan")
    return slices, volume


def run_comparison_report(p, g, spacing, volume_metrics, progress=None, should_cancel=None):
    """:func:`comparison_report` driven by a :class:`TaskRunner` (progress, cancel)."""
    steps = comparison_report(p, g, spacing, volume_metrics)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)
        if should_cancel is not None and should_cancel():
            raise CancelledError("Export cancelled.")
