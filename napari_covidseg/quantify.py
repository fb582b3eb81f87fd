"""Lung and infection volumes, involvement, severity, lesions and their density (numpy/scipy).

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

Involvement is infection over **lung plus infection**: lung masks (and the networks that make
them) often leave dense consolidation out of the lung, and such infection is still diseased lung.
Infection outside the lung mask goes to the side of the sagittal plane halfway between the two
lungs' mean columns.  So ``total_involvement_pct`` = infection / (lung | infection), and each
side's involvement is that side's infection over that side's lung | infection.

Severity (``severity_grade``) is the MosMedData scale of the share of lung involved: CT-0 no
lesion, CT-1 up to 25 %, CT-2 over 25 up to 50 %, CT-3 over 50 and under 75 %, CT-4 75 % or more.
The per-lung score (``left_lung_score``, ``right_lung_score``, 0-5 each, ``lung_score_total``
0-10) adapts the lobar CT severity score (0 none, 1 under 5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %,
5 over 75 %) to whole lungs, since lobes are not segmented.

Lesions are the 3D connected components (26-connectivity) of the infection mask; components
smaller than ``min_lesion_ml`` (default :data:`MIN_LESION_ML` = 0.1 mL, i.e. 100 mm^3, about a
5 mm sphere: below it a "lesion" of a prediction is mostly a speck of noise) are not counted as
lesions and a CT with none is graded CT-0, but all infection voxels count in the volumes.

Ground glass vs consolidation, where the CT is given in HU: infection voxels below
:data:`GGO_MAX_HU` (-300 HU) are ground-glass opacity, the others consolidation (the usual
quantitative-CT split: GGO about -750..-300 HU, consolidation above).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError

MIN_LESION_ML = 0.1
GGO_MAX_HU = -300.0
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


def _side_of_columns(left: np.ndarray, right: np.ndarray, shape) -> np.ndarray:
    """Boolean (z, y, x): True on the patient's left of the plane halfway between the lungs' mean columns."""
    cols = np.arange(shape[2], dtype=float)
    means = [float((m.sum(axis=(0, 1)) * cols).sum() / m.sum()) for m in (left, right) if m.any()]
    boundary = sum(means) / len(means) if len(means) == 2 else (shape[2] - 1) / 2.0
    return np.broadcast_to(cols > boundary, shape)


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else float("nan")


def severity_grade(involvement_pct: float, n_lesions: int) -> str:
    """MosMedData CT-0..CT-4 of the share of lung involved (see the module docstring)."""
    if n_lesions == 0 or not math.isfinite(involvement_pct) or involvement_pct <= 0:
        return "CT-0"
    for limit, grade in ((25.0, "CT-1"), (50.0, "CT-2")):
        if involvement_pct <= limit:
            return grade
    return "CT-3" if involvement_pct < 75.0 else "CT-4"


def lung_score(involvement_pct: float) -> int:
    """0-5 score of one lung's involvement (the lobar CT severity score applied to a lung)."""
    if not math.isfinite(involvement_pct) or involvement_pct <= 0:
        return 0
    if involvement_pct < 5.0:
        return 1
    for limit, score in ((25.0, 2), (50.0, 3), (75.0, 4)):
        if involvement_pct <= limit:
            return score
    return 5


def _lesions(inf_mask, voxel_ml: float, min_size: float, spacing_known: bool) -> list:
    labels, n = ndimage.label(inf_mask, structure=_STRUCTURE_26)
    if not n:
        return []
    volumes = np.bincount(labels.ravel())[1:] * voxel_ml
    return sorted((float(v) if spacing_known else int(v) for v in volumes if v >= min_size), reverse=True)


def _density(ct, inf_mask, size) -> Dict:
    """Ground glass and consolidation sizes of the infection (CT in HU only)."""
    if ct is None:
        return {}
    ct = np.asarray(ct)
    if ct.shape != inf_mask.shape:
        raise InputError(f"The CT has shape {ct.shape} but the masks have shape {inf_mask.shape}: "
                         "choose the CT the masks were made from.")
    ggo = inf_mask & (ct < GGO_MAX_HU)
    return {"ground_glass": size(ggo), "consolidation": size(inf_mask & ~ggo)}


def quantify(lung, infection, spacing: Sequence[float], min_lesion_ml: float = MIN_LESION_ML,
             spacing_known: bool = True, ct_hu=None) -> Dict:
    """Volumes (mL), involvement (%), severity, lesions and (with ``ct_hu``) their density.

    Returns a dict with ``lung_ml``, ``infection_ml`` (all infection voxels),
    ``infection_outside_lung_ml``, ``left_lung_ml``, ``right_lung_ml``, ``left_infection_ml``,
    ``right_infection_ml`` (infection on each side, inside the lung mask or not),
    ``left_involvement_pct``, ``right_involvement_pct``, ``total_involvement_pct`` (over lung |
    infection; NaN when both are empty), ``severity_grade``, ``left_lung_score``,
    ``right_lung_score``, ``lung_score_total``, ``n_lesions``, ``lesion_volumes_ml`` (largest
    first, lesions of at least ``min_lesion_ml``), ``min_lesion_ml`` (the size used), ``lung_split_method``,
    ``voxel_volume_ml``, ``spacing_known`` and ``volume_unit``; with ``ct_hu`` (the CT in HU, same
    shape) also ``ground_glass_ml`` and ``consolidation_ml``.

    ``spacing_known=False`` (the spacing is a placeholder, e.g. 8-bit slices published without
    it): no millilitres can be derived, so every ``*_ml`` key becomes ``*_voxels`` (voxel counts),
    lesions are kept from ``min_lesion_ml * 1000`` voxels (the same size at 1 mm voxels) and
    ``voxel_volume_ml`` is ``None``; percentages, grades and scores are unit-free and stay.
    """
    lung_mask, inf_mask, spacing = _check(lung, infection, spacing)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0 if spacing_known else 1.0
    suffix = "_ml" if spacing_known else "_voxels"

    def size(mask) -> float:
        count = int(np.count_nonzero(mask))
        return float(count) * voxel_ml if spacing_known else count

    left, right, method = split_left_right(lung_mask)
    on_left = _side_of_columns(left, right, lung_mask.shape)
    left_inf, right_inf = inf_mask & (left | (~lung_mask & on_left)), inf_mask & (right | (~lung_mask & ~on_left))
    involved = {side: _pct(size(i), size(l | i)) for side, l, i in (("left", left, left_inf), ("right", right, right_inf))}
    total = _pct(size(inf_mask), size(lung_mask | inf_mask))
    lesions = _lesions(inf_mask, voxel_ml, min_lesion_ml if spacing_known else min_lesion_ml * 1000.0, spacing_known)
    sizes = {"lung": size(lung_mask), "infection": size(inf_mask), "infection_outside_lung": size(inf_mask & ~lung_mask),
             "left_lung": size(left), "right_lung": size(right), "left_infection": size(left_inf),
             "right_infection": size(right_inf), **_density(ct_hu, inf_mask, size)}
    scores = {side: lung_score(pct) if lesions else 0 for side, pct in involved.items()}
    return {
        **{name + suffix: value for name, value in sizes.items()},
        "left_involvement_pct": involved["left"],
        "right_involvement_pct": involved["right"],
        "total_involvement_pct": total,
        "severity_grade": severity_grade(total, len(lesions)),
        "left_lung_score": scores["left"],
        "right_lung_score": scores["right"],
        "lung_score_total": scores["left"] + scores["right"],
        "n_lesions": len(lesions),
        "lesion_volumes" + suffix: lesions,
        "min_lesion" + suffix: float(min_lesion_ml) if spacing_known else min_lesion_ml * 1000.0,
        "lung_split_method": method,
        "voxel_volume_ml": voxel_ml if spacing_known else None,
        "spacing_known": bool(spacing_known),
        "volume_unit": "mL" if spacing_known else "voxels",
    }
