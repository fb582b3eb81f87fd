"""Is a segmentation plausible, and optional clean-ups of it (numpy/scipy only, no Qt).

A network that was trained on other data, or trained too briefly, can return masks that are
obviously wrong: lung outside the patient, "infection" filling the chest, nothing at all.  The
Segment widget runs :func:`check_result` after every run and shows what it finds, so a number
is never read off a result nobody would believe.

The body is found without a network: voxels denser than air (above -500 HU for a CT in HU;
above the Otsu threshold for an 8-bit display image), the largest 3D connected component (the
patient, not the table or the air), with the holes of every axial slice filled (the lungs are
holes in the body).  It is computed at half the in-plane resolution (a check and a clean-up need
no more) and returned at full size.

Checks (each gives a :class:`Finding`):

* no lung voxel at all (warning);
* more than :data:`LUNG_OUTSIDE_BODY_MAX` of the lung outside the body (warning);
* a lung volume above :data:`LUNG_ML_MAX` mL where the spacing is real (warning: an adult's
  total lung capacity is about 6 L);
* infection over more than :data:`INFECTION_SHARE_MAX` of lung + infection (warning: beyond the
  worst CT-4 cases), or mostly outside the lung mask (warning);
* no infection (a note: a healthy CT, or a network that misses it).

Post-processing (:class:`PostProcessing`, all off by default, applied in this order):

* ``lung_in_body``: lung voxels outside the body are removed;
* ``lung_components``: only the lung's largest 3D components are kept (the two lungs: the
  second when it holds at least 10 % of the first), dropping specks in the bowel, the airway or
  outside the patient;
* ``min_lesion_ml``: infection components smaller than this (mL; in voxels at 1 mm where the
  spacing is a placeholder) are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from scipy import ndimage

HU_BODY_THRESHOLD = -500.0
LUNG_OUTSIDE_BODY_MAX = 0.05
LUNG_ML_MAX = 10_000.0
INFECTION_SHARE_MAX = 0.80
INFECTION_OUTSIDE_LUNG_MAX = 0.50
SECOND_LUNG_MIN_FRACTION = 0.10
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Finding:
    level: str  # "warning" or "note"
    text: str


@dataclass(frozen=True)
class PostProcessing:
    lung_in_body: bool = False
    lung_components: bool = False
    min_lesion_ml: float = 0.0

    @property
    def active(self) -> bool:
        return self.lung_in_body or self.lung_components or self.min_lesion_ml > 0

    def describe(self) -> str:
        parts = (["lung kept inside the body"] * self.lung_in_body + ["largest lung components kept"] * self.lung_components
                 + [f"lesions under {self.min_lesion_ml:g} mL removed"] * (self.min_lesion_ml > 0))
        return ", ".join(parts)


def _body_threshold(ct: np.ndarray, domain: str) -> float:
    if domain == "hu":
        return HU_BODY_THRESHOLD
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(ct[:: max(1, ct.shape[0] // 16)]))


def body_mask(ct: np.ndarray, domain: str = "hu") -> np.ndarray:
    """Boolean (z, y, x) mask of the patient's body, lungs included (see the module docstring)."""
    small = np.asarray(ct)[:, ::2, ::2]
    dense = small > _body_threshold(small, domain)
    labels, n = ndimage.label(dense, structure=_STRUCTURE_26)
    if n == 0:
        return np.zeros(ct.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == int(np.argmax(sizes)) + 1
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    full = np.repeat(np.repeat(body, 2, axis=1), 2, axis=2)
    return full[:, : ct.shape[1], : ct.shape[2]]


def largest_components(mask: np.ndarray, min_fraction: float = SECOND_LUNG_MIN_FRACTION, keep: int = 2) -> np.ndarray:
    """``mask`` with only its ``keep`` largest 3D components, each at least ``min_fraction`` of the largest."""
    labels, n = ndimage.label(mask != 0, structure=_STRUCTURE_26)
    if n <= 1:
        return mask != 0
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep]
    kept = [int(i) + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(labels, kept)


def drop_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, n = ndimage.label(mask != 0, structure=_STRUCTURE_26)
    if n == 0:
        return mask != 0
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def voxel_ml(spacing, spacing_known: bool) -> float:
    """mL of one voxel; 0.001 (1 mm^3) where the spacing is a placeholder."""
    return float(np.prod(spacing)) / 1000.0 if spacing_known else 0.001


def postprocess(lung: np.ndarray, infection: np.ndarray, body: Optional[np.ndarray], options: PostProcessing,
                spacing, spacing_known: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The masks after ``options`` (uint8 0/1); unchanged when no option is on."""
    lung, infection = np.asarray(lung) != 0, np.asarray(infection) != 0
    if options.lung_in_body and body is not None:
        lung &= body
    if options.lung_components and lung.any():
        lung = largest_components(lung)
    if options.min_lesion_ml > 0 and infection.any():
        infection = drop_small_components(infection, options.min_lesion_ml / voxel_ml(spacing, spacing_known))
    return lung.astype(np.uint8), infection.astype(np.uint8)


def check_result(lung: np.ndarray, infection: np.ndarray, body: Optional[np.ndarray], spacing,
                 spacing_known: bool = True) -> List[Finding]:
    """What is implausible about these masks (empty list: nothing)."""
    lung, infection = np.asarray(lung) != 0, np.asarray(infection) != 0
    findings = []
    n_lung, n_inf = int(lung.sum()), int(infection.sum())
    if n_lung == 0:
        findings.append(Finding("warning", "No lung was found: is this a chest CT, and do the weights read this kind of image?"))
    elif body is not None:
        outside = int((lung & ~body).sum()) / n_lung
        if outside > LUNG_OUTSIDE_BODY_MAX:
            findings.append(Finding("warning", f"{100 * outside:.0f}% of the lung mask lies outside the body: "
                                               "the network is confused by this image (try Keep lung inside the body)."))
    if spacing_known and n_lung * voxel_ml(spacing, True) > LUNG_ML_MAX:
        findings.append(Finding("warning", f"The lung mask holds {n_lung * voxel_ml(spacing, True) / 1000:.1f} L "
                                           "(an adult's lungs hold about 6 L): far too much."))
    if n_inf == 0:
        findings.append(Finding("note", "No infection was found (a healthy CT, or a network that misses it)."))
        return findings
    share = n_inf / max(1, int((lung | infection).sum()))
    if share > INFECTION_SHARE_MAX:
        findings.append(Finding("warning", f"Infection covers {100 * share:.0f}% of lung + infection, more than the most "
                                           "severe cases: the network is probably not fit for this image."))
    outside_lung = int((infection & ~lung).sum()) / n_inf
    if n_lung and outside_lung > INFECTION_OUTSIDE_LUNG_MAX:
        findings.append(Finding("warning", f"{100 * outside_lung:.0f}% of the infection lies outside the lung mask."))
    return findings
