"""Segmentation metrics shared by the GUI (Compare widget) and training (validation log).

One module, pure numpy/scipy, so that the number a user reads in napari and the number written
to ``metrics.jsonl`` by the trainer are computed by the same code.

Inputs are masks of any dimension (2D slices, 3D volumes), bool or integer: any non-zero value
is foreground, so a lung mask with 1 = left and 2 = right lung counts as one lung.

Empty-mask conventions
----------------------
A ratio whose denominator is zero is a case where *no error of the kind it measures was
possible*, so it is reported as 1.0 ("nothing went wrong"), and the other ratios catch the
error instead:

- both masks empty: dice, iou, sensitivity, precision, f_measure = 1.0; hd95 = 0.0
  (the prediction is exactly right: there is nothing to find and nothing was found);
- ground truth empty, prediction not: dice = iou = f_measure = precision = 0.0, sensitivity = 1.0
  (nothing to miss); prediction empty, ground truth not: dice = iou = f_measure =
  sensitivity = 0.0, precision = 1.0 (nothing claimed falsely);
- exactly one mask empty: hd95 = NaN, because the distance from a surface to an empty set is
  undefined (medpy raises, MONAI returns NaN/inf); a finite number would have to be invented
  (e.g. the image diagonal) and would depend on the field of view, not on the segmentation;
- no negatives at all (the ground truth covers everything): specificity = 1.0.

HD95 follows medpy's ``hd95``: surface voxels are the mask minus its erosion (face connectivity,
voxels on the image border count as surface); the distances from every surface voxel of one
mask to the nearest surface voxel of the other, in mm (Euclidean, with the voxel spacing), are
pooled in both directions and their 95th percentile is taken (numpy's linear interpolation).
The nearest surface voxels are found by looking up the other surface at the voxel offsets within
3 voxels in order of length (exact: every shorter offset was looked at first), and with a k-d
tree on the surface points (as MONAI does) for voxels farther away; not a dense distance
transform of the bounding box: the work grows with the surface, not the volume, and the
distances are the same exact Euclidean ones.  A voxel on both surfaces is 0 mm away.

The ratios come from one set of confusion counts (:func:`ratios_from_counts`), so a caller that
needs several ratios counts the voxels once.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy.spatial import cKDTree

from .errors import InputError

__all__ = [
    "confusion",
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "precision",
    "f_measure",
    "hd95",
    "mae",
    "all_metrics",
    "ratios_from_counts",
    "per_slice_dice",
    "per_slice_counts",
    "per_slice_metrics",
    "METRIC_KEYS",
]

METRIC_KEYS = ("dice", "iou", "sensitivity", "specificity", "precision", "f_measure", "hd95_mm", "mae")


def _masks(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    g = np.asarray(gt)
    if p.shape != g.shape:
        raise InputError(
            f"The prediction has shape {p.shape} but the ground truth has shape {g.shape}: "
            "metrics need two masks of the same image."
        )
    p = p if p.dtype == bool else p != 0
    g = g if g.dtype == bool else g != 0
    return p, g


def _ratio(num: float, den: float) -> float:
    """num / den, or 1.0 when the denominator is zero (see the module's empty-mask conventions)."""
    return float(num) / float(den) if den > 0 else 1.0


def confusion(pred, gt) -> Tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives) as Python ints."""
    p, g = _masks(pred, gt)
    tp = int(np.count_nonzero(p & g))
    n_pred = int(np.count_nonzero(p))
    n_gt = int(np.count_nonzero(g))
    fp = n_pred - tp
    fn = n_gt - tp
    tn = int(p.size) - tp - fp - fn
    return tp, fp, fn, tn


def dice(pred, gt) -> float:
    """2 TP / (2 TP + FP + FN); 1.0 when both masks are empty."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred, gt) -> float:
    """Jaccard index TP / (TP + FP + FN); 1.0 when both masks are empty."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _ratio(tp, tp + fp + fn)


def sensitivity(pred, gt) -> float:
    """Recall TP / (TP + FN); 1.0 when the ground truth is empty (nothing to miss)."""
    tp, _, fn, _ = confusion(pred, gt)
    return _ratio(tp, tp + fn)


def specificity(pred, gt) -> float:
    """TN / (TN + FP); 1.0 when there are no negatives."""
    _, fp, _, tn = confusion(pred, gt)
    return _ratio(tn, tn + fp)


def precision(pred, gt) -> float:
    """TP / (TP + FP); 1.0 when the prediction is empty (nothing claimed falsely)."""
    tp, fp, _, _ = confusion(pred, gt)
    return _ratio(tp, tp + fp)


def f_measure(pred, gt, beta: float = 1.0) -> float:
    """F-beta score (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP); equals Dice for beta = 1.

    Written with counts rather than from precision and recall so the empty cases follow the
    same convention as Dice (1.0 when both are empty, 0.0 when exactly one is).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    tp, fp, fn, _ = confusion(pred, gt)
    b2 = float(beta) ** 2
    return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def _spacing_for(ndim: int, spacing: Optional[Sequence[float]]) -> Tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) == 1:
        spacing = spacing * ndim
    if len(spacing) != ndim:
        raise InputError(f"The spacing {spacing} has {len(spacing)} values but the masks have {ndim} dimensions.")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"The voxel spacing {spacing} must be positive numbers (mm).")
    return spacing


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face neighbour in the background (or the image border):
    ``mask`` minus its erosion with face connectivity and a background border (as
    ``ndimage.binary_erosion(mask, border_value=0)``, with shifted views: several times faster)."""
    inner = mask.copy()
    for axis in range(mask.ndim):
        def cut(part):
            index = [slice(None)] * mask.ndim
            index[axis] = part
            return tuple(index)

        inner[cut(slice(0, -1))] &= mask[cut(slice(1, None))]
        inner[cut(slice(1, None))] &= mask[cut(slice(0, -1))]
        inner[cut(0)] = False
        inner[cut(-1)] = False
    return mask & ~inner


def _points(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(n, ndim) coordinates in mm of a boolean array's set voxels, in C order."""
    index = np.unravel_index(np.flatnonzero(surface), surface.shape)
    return np.stack(index, axis=1) * np.asarray(spacing, dtype=np.float64)


# Voxel offsets searched around each surface voxel before the k-d tree (see _near_offsets)
LOCAL_RADIUS = 3


def _local_offsets(spacing: Sequence[float], radius: int = LOCAL_RADIUS) -> Tuple[np.ndarray, np.ndarray]:
    """Integer offsets (n, ndim) within ``radius`` voxels, sorted by length in mm, and their lengths,
    kept up to ``radius * min(spacing)``: every offset shorter than a kept one is in the list, so the
    first offset that reaches the other surface gives the exact nearest distance."""
    grid = np.stack(np.meshgrid(*[np.arange(-radius, radius + 1)] * len(spacing), indexing="ij"), -1).reshape(-1, len(spacing))
    lengths = np.sqrt(((grid * np.asarray(spacing)) ** 2).sum(axis=1))
    keep = (lengths > 0) & (lengths <= radius * min(spacing) + 1e-9)
    order = np.argsort(lengths[keep], kind="stable")
    return grid[keep][order], lengths[keep][order]


def _near_offsets(queries: np.ndarray, to_surface: np.ndarray, spacing) -> Tuple[np.ndarray, np.ndarray]:
    """Exact distances (mm) for the voxels ``queries`` (n, ndim indices) whose nearest voxel of
    ``to_surface`` is within ``LOCAL_RADIUS * min(spacing)``, found by looking up the offsets of
    :func:`_local_offsets` in order of length; returns (resolved or not, distances)."""
    r = LOCAL_RADIUS
    padded = np.pad(to_surface, r)
    strides = np.array(padded.strides) // padded.itemsize
    flat, target = (queries + r) @ strides, padded.ravel()
    distance = np.full(len(queries), np.inf)
    open_ = np.arange(len(queries))
    for offset, length in zip(*_local_offsets(spacing, r)):
        hit = target[flat[open_] + int(offset @ strides)]
        if hit.any():
            distance[open_[hit]] = length
            open_ = open_[~hit]
            if not len(open_):
                break
    return np.isfinite(distance), distance


def _nearest(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm of each voxel of ``from_surface`` (C order) to the nearest voxel of
    ``to_surface``: 0 for voxels on both surfaces, exact offset lengths for those with the other
    surface a few voxels away, a k-d tree of ``to_surface``'s points for the rest (built only then)."""
    out = np.zeros(int(np.count_nonzero(from_surface)), dtype=np.float64)
    here_only = from_surface & ~to_surface
    only_here = here_only[from_surface]
    if only_here.any():
        queries = np.stack(np.nonzero(here_only), axis=1)
        near, distance = _near_offsets(queries, to_surface, spacing)
        if not near.all():
            tree = cKDTree(_points(to_surface, spacing), balanced_tree=False, compact_nodes=False)  # faster to build
            distance[~near] = tree.query(queries[~near] * np.asarray(spacing, dtype=np.float64), workers=-1)[0]
        out[only_here] = distance
    return out


def surface_distances(pred, gt, spacing: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Distances in mm (pred surface -> nearest gt surface, gt surface -> nearest pred surface),
    each in the C order of its surface voxels.

    Both masks must be non-empty.  Only the bounding box of the two masks (one voxel of margin
    where the image allows, so erosion sees the same neighbours) is processed.
    """
    p, g = _masks(pred, gt)
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    sp = _spacing_for(p.ndim, spacing)
    either = p | g
    box = []
    for axis in range(p.ndim):
        other = tuple(a for a in range(p.ndim) if a != axis)
        idx = np.flatnonzero(either.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, p.shape[axis])))
    box = tuple(box)
    p_box, g_box = p[box], g[box]
    # Voxels on the image border are surface (as in medpy); a crop border that is not an image
    # border always has a background margin voxel, so the erosion is the same as uncropped.
    sp_surface, sg_surface = _surface(p_box), _surface(g_box)
    return _nearest(sp_surface, sg_surface, sp), _nearest(sg_surface, sp_surface, sp)


def hd95(pred, gt, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile Hausdorff distance in mm (medpy's definition; see the module docstring).

    0.0 when both masks are empty, NaN when exactly one is empty.
    """
    p, g = _masks(pred, gt)
    _spacing_for(p.ndim, spacing)  # validate even for empty masks
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return float("nan")
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def mae(prob, gt) -> float:
    """Mean absolute error between a probability map (or binary prediction) and a binary mask."""
    prob = np.asarray(prob)
    if prob.dtype != bool:
        prob = prob.astype(np.float64, copy=False)
    g = np.asarray(gt)
    if prob.shape != g.shape:
        raise InputError(f"The probability map has shape {prob.shape} but the ground truth has shape {g.shape}.")
    if prob.size == 0:
        return 0.0
    if prob.dtype == bool:
        return float(np.count_nonzero(prob != (g != 0))) / prob.size
    return float(np.mean(np.abs(prob - (g != 0))))


def infnet_mean_dice(prob, gt, n_thresholds: int = 256) -> float:
    """Inf-Net's evaluation Dice of one image (Fan et al., TMI 2020, their ``EvaluationTools``):
    the probability map is min-max normalised, thresholded at ``n_thresholds`` levels from 1 to
    0, and the Dice of each binary map is averaged; a threshold without a true positive scores 0.
    A constant map (nothing to normalise) is thresholded as is."""
    gt = np.asarray(gt) != 0
    p = np.asarray(prob, dtype=np.float64)
    lo, hi = float(p.min()), float(p.max())
    p = (p - lo) / (hi - lo) if hi > lo else p
    order = np.sort(p.ravel())[::-1]  # descending: pred(t) = p >= t
    gt_sorted = gt.ravel()[np.argsort(-p.ravel(), kind="stable")]
    tp_cum = np.cumsum(gt_sorted)
    n_gt = int(gt.sum())
    scores = []
    for t in np.linspace(1.0, 0.0, n_thresholds):
        k = int(np.searchsorted(-order, -t, side="right"))  # number of pixels with p >= t
        tp = int(tp_cum[k - 1]) if k else 0
        scores.append(2.0 * tp / (k + n_gt) if tp > 0 else 0.0)
    return float(np.mean(scores))


def ratios_from_counts(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """Dice, IoU, sensitivity, specificity, precision and F1 of one set of confusion counts
    (the module's empty-mask conventions)."""
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f_measure": _ratio(2 * tp, 2 * tp + fn + fp),
    }


def all_metrics(pred, gt, spacing: Optional[Sequence[float]] = None, prob=None, with_hd95: bool = True) -> Dict[str, float]:
    """Every metric of :data:`METRIC_KEYS` in one dict (plain floats).

    ``spacing`` is the voxel size in mm per axis (default 1 mm); ``prob`` is the network's
    foreground probability for the MAE (without it the MAE is that of the binary prediction,
    i.e. the fraction of wrong voxels).  ``with_hd95=False`` skips the distance transform
    (``hd95_mm`` is then NaN) for callers that need the ratios fast.
    """
    p, g = _masks(pred, gt)
    out = ratios_from_counts(*confusion(p, g))
    out["hd95_mm"] = hd95(p, g, spacing) if with_hd95 else float("nan")
    out["mae"] = mae(p if prob is None else prob, g)
    return out


def per_slice_counts(pred, gt) -> np.ndarray:
    """(slices, 4) int64: TP, FP, FN, TN of each slice along axis 0 (one pass, slice by slice)."""
    p, g = _masks(pred, gt)
    if p.ndim < 2:
        raise InputError(f"Per-slice metrics need at least 2D masks, got shape {p.shape}.")
    counts = np.empty((p.shape[0], 4), dtype=np.int64)
    size = int(np.prod(p.shape[1:]))
    for z in range(p.shape[0]):
        tp = np.count_nonzero(p[z] & g[z])
        n_pred, n_gt = np.count_nonzero(p[z]), np.count_nonzero(g[z])
        counts[z] = tp, n_pred - tp, n_gt - tp, size - n_pred - n_gt + tp
    return counts


def _per_slice_counts(pred, gt, counts: Optional[np.ndarray] = None):
    counts = per_slice_counts(pred, gt) if counts is None else np.asarray(counts)
    return tuple(counts[:, k].astype(np.float64) for k in range(4))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.ones_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_slice_dice(pred, gt, counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Dice of each slice along axis 0; NaN on slices where both masks are empty.

    NaN (not 1.0) because an empty slice says nothing about the segmentation: averaging or
    ranking slices should skip it (``np.nanmean``).  ``counts`` from :func:`per_slice_counts`
    (of these masks) saves counting again.
    """
    tp, fp, fn, _ = _per_slice_counts(pred, gt, counts)
    den = 2 * tp + fp + fn
    out = _safe_div(2 * tp, den)
    out[den == 0] = np.nan
    return out


def per_slice_metrics(pred, gt, counts: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Dice, IoU, sensitivity, specificity, precision per slice (axis 0) plus voxel counts.

    Ratio metrics are NaN on slices where both masks are empty (see :func:`per_slice_dice`);
    elsewhere they follow the module's conventions.  ``gt_voxels`` and ``pred_voxels`` are ints.
    ``counts`` as for :func:`per_slice_dice`.
    """
    tp, fp, fn, tn = _per_slice_counts(pred, gt, counts)
    both_empty = (tp + fp + fn) == 0
    out = {
        "dice": _safe_div(2 * tp, 2 * tp + fp + fn),
        "iou": _safe_div(tp, tp + fp + fn),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "precision": _safe_div(tp, tp + fp),
    }
    for values in out.values():
        values[both_empty] = np.nan
    out["gt_voxels"] = (tp + fn).astype(np.int64)
    out["pred_voxels"] = (tp + fp).astype(np.int64)
    return out
