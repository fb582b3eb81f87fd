"""Lung and infection volumes, per-lung involvement and lesion count (pure numpy/scipy).

Left and right are the **patient's** sides.  Arrays are display-ordered (z, y, x) and the column
index x grows toward the patient's left (see ``io/geometry.py``), so the left lung is the one on
the high-x side of the image (the right side of the screen, as radiologists read).

How the lung mask is split into left and right:

1. The lung mask (any non-zero voxel) is split into 3D connected components (26-connectivity).
   When the two largest components are both substantial (the smaller holds at least
   :data:`MIN_SECOND_LUNG_FRACTION` of the larger), they are the two lungs; the one with the
   larger mean column is the left lung.  Every other (small) component goes to the side of the
   boundary between the two lungs' mean columns that its own mean column lies on.
2. Otherwise (the lungs touch, e.g. at the anterior junction, or a single lung is present) the
   split is a sagittal plane at the column with the fewest lung voxels within the central 40 %
   of the lung's bounding box (the gap between the lungs; ties -> closest to the centre).

Lesions are the 3D connected components (26-connectivity) of the infection mask; components
smaller than ``min_lesion_ml`` (default :data:`MIN_LESION_ML` = 0.01 mL, i.e. 10 mm^3, below any
clinically reported lesion and mostly single-voxel noise of a prediction) are not counted as
lesions, but all infection voxels count in the volumes.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError

MIN_LESION_ML = 0.01
MIN_SECOND_LUNG_FRACTION = 0.2
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _check(lung, infection, spacing) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    lung = np.asarray(lung)
    infection = np.asarray(infection)
    if lung.ndim != 3:
        raise InputError(f"Quantification needs a 3D lung mask (z, y, x); got shape {lung.shape}.")
    if lung.shape != infection.shape:
        raise InputError(
            f"The lung mask has shape {lung.shape} but the infection mask has shape {infection.shape}: "
            "choose two masks of the same CT."
        )
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"The voxel spacing must be three positive numbers (z, y, x) in mm; got {spacing}.")
    return lung != 0, infection != 0, spacing


def split_left_right(lung: np.ndarray) -> Tuple[np.ndarray, np.ndarray, str]:
    """(left, right, method) boolean masks of the patient's left and right lung.

    ``method`` is ``"components"`` or ``"midline"`` (see the module docstring).
    """
    lung = np.asarray(lung) != 0
    if not lung.any():
        empty = np.zeros(lung.shape, bool)
        return empty, empty.copy(), "empty"
    labels, n = ndimage.label(lung, structure=_STRUCTURE_26)
    if n >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        first, second = int(order[0]) + 1, int(order[1]) + 1
        if sizes[second - 1] >= MIN_SECOND_LUNG_FRACTION * sizes[first - 1]:
            # mean column of every component from per-column counts (no per-component loop over voxels)
            x_index = np.broadcast_to(np.arange(lung.shape[2]), lung.shape)
            x_sum = np.bincount(labels.ravel(), weights=x_index.ravel(), minlength=n + 1)[1:]
            x_mean = x_sum / sizes
            a, b = x_mean[first - 1], x_mean[second - 1]
            boundary = (a + b) / 2.0
            is_left = np.concatenate([[False], x_mean > boundary])
            left = is_left[labels] & lung
            right = lung & ~left
            return left, right, "components"
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    lo, hi = int(cols[0]), int(cols[-1])
    centre = (lo + hi) / 2.0
    half = max(1, int(round(0.2 * (hi - lo + 1))))
    candidates = np.arange(max(lo, int(centre) - half), min(hi, int(centre) + half) + 1)
    counts = lung.sum(axis=(0, 1))[candidates]
    best = counts.min()
    ties = candidates[counts == best]
    split = int(ties[np.argmin(np.abs(ties - centre))])
    left = np.zeros(lung.shape, bool)
    left[..., split + 1 :] = lung[..., split + 1 :]
    right = lung & ~left
    return left, right, "midline"


def quantify(lung, infection, spacing: Sequence[float], min_lesion_ml: float = MIN_LESION_ML,
             spacing_known: bool = True) -> Dict:
    """Volumes (mL), involvement (%) and lesions of one CT.

    Returns a dict with ``lung_ml``, ``infection_ml`` (all infection voxels),
    ``infection_outside_lung_ml``, ``left_lung_ml``, ``right_lung_ml``, ``left_infection_ml``,
    ``right_infection_ml`` (infection inside each lung), ``left_involvement_pct``,
    ``right_involvement_pct``, ``total_involvement_pct`` (infection inside the lungs / lung
    volume; NaN for a lung of zero volume), ``n_lesions``, ``lesion_volumes_ml`` (largest
    first, lesions of at least ``min_lesion_ml``), ``lung_split_method``, ``voxel_volume_ml``,
    ``spacing_known`` and ``volume_unit``.

    ``spacing_known=False`` (the spacing is a placeholder, e.g. 8-bit slices published without
    it): no millilitres can be derived, so every ``*_ml`` key becomes ``*_voxels`` (voxel counts),
    lesions are kept from ``min_lesion_ml * 1000`` voxels (the same size at 1 mm voxels) and
    ``voxel_volume_ml`` is ``None``; percentages are unit-free and stay.
    """
    lung_mask, inf_mask, spacing = _check(lung, infection, spacing)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0 if spacing_known else 1.0
    min_lesion = min_lesion_ml if spacing_known else min_lesion_ml * 1000.0
    suffix = "_ml" if spacing_known else "_voxels"
    left, right, method = split_left_right(lung_mask)

    def size(mask) -> float:
        count = int(np.count_nonzero(mask))
        return float(count) * voxel_ml if spacing_known else count

    def pct(part: float, whole: float) -> float:
        return 100.0 * part / whole if whole > 0 else float("nan")

    lung_size = size(lung_mask)
    left_size, right_size = size(left), size(right)
    left_inf, right_inf = size(inf_mask & left), size(inf_mask & right)
    labels, n = ndimage.label(inf_mask, structure=_STRUCTURE_26)
    lesions = []
    if n:
        volumes = np.bincount(labels.ravel())[1:] * voxel_ml
        lesions = sorted((float(v) if spacing_known else int(v) for v in volumes if v >= min_lesion), reverse=True)
    sizes = {"lung": lung_size, "infection": size(inf_mask), "infection_outside_lung": size(inf_mask & ~lung_mask),
             "left_lung": left_size, "right_lung": right_size, "left_infection": left_inf, "right_infection": right_inf}
    return {
        **{name + suffix: value for name, value in sizes.items()},
        "left_involvement_pct": pct(left_inf, left_size),
        "right_involvement_pct": pct(right_inf, right_size),
        "total_involvement_pct": pct(left_inf + right_inf, lung_size),
        "n_lesions": len(lesions),
        "lesion_volumes" + suffix: lesions,
        "lung_split_method": method,
        "voxel_volume_ml": voxel_ml if spacing_known else None,
        "spacing_known": bool(spacing_known),
        "volume_unit": "mL" if spacing_known else "voxels",
    }
