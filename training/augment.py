"""Data augmentation for 2D slices and 3D patches (numpy), each transform applied with a probability.

Transforms are drawn from a ``numpy.random.Generator`` passed in by the caller, so a sample's
augmentation depends only on (seed, epoch, sample index): a resumed run sees exactly the samples
an uninterrupted run would have seen.  Geometric transforms move image and masks together
(masks with nearest-neighbour interpolation); intensity transforms touch the image only and work
on the already-normalised network input.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

KNOWN = ("flip", "mirror", "rotate", "scale", "elastic", "gamma", "brightness", "contrast", "noise", "lowres")

DEFAULT_PROBABILITIES: Dict[str, float] = {
    "flip": 0.5, "rotate": 0.3, "scale": 0.3, "elastic": 0.2, "gamma": 0.3, "brightness": 0.3, "contrast": 0.3, "noise": 0.2,
    "lowres": 0.25,
}
#: "lowres": in-plane down-sampling factor range (then back up), as nnU-Net's low-resolution simulation
LOWRES_FACTORS = (1.5, 4.0)
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.15)


def check_names(names: Sequence[str]) -> Tuple[str, ...]:
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    return tuple(names)


def _affine_plane(image, masks, rng, rotate: bool, scale: bool):
    """Rotate/scale about the centre in the last two axes (in-plane), same transform for every slice."""
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)) if rotate else 0.0
    factor = rng.uniform(*SCALE_RANGE) if scale else 1.0
    c, s = np.cos(angle), np.sin(angle)
    m2 = np.array([[c, -s], [s, c]]) / factor
    h, w = image.shape[-2:]
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - m2 @ centre
    if image.ndim == 3:
        matrix = np.eye(3)
        matrix[1:, 1:] = m2
        off = np.concatenate([[0.0], offset])
    else:
        matrix, off = m2, offset
    out_img = ndimage.affine_transform(image, matrix, offset=off, order=1, mode="nearest")
    out_masks = [ndimage.affine_transform(m, matrix, offset=off, order=0, mode="constant", cval=0) for m in masks]
    return out_img, out_masks


def _elastic(image, masks, rng, alpha: float = 6.0, sigma: float = 4.0):
    shape = image.shape
    displacement = [ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma) * alpha for _ in range(image.ndim)]
    if image.ndim == 3:
        displacement[0] = np.zeros(shape)  # keep slices in place: z spacing is coarse
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    coords = [g + d for g, d in zip(grid, displacement)]
    out_img = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    out_masks = [ndimage.map_coordinates(m, coords, order=0, mode="constant") for m in masks]
    return out_img, out_masks


def _low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """The image as a scanner ``factor`` times coarser in-plane would show it: area-averaged
    down, linear back up (the masks stay sharp: the anatomy did not change)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    t = t[None, None] if image.ndim == 2 else t[:, None]
    size = tuple(int(t.shape[-2:][i]) for i in range(2))
    small = tuple(max(4, int(round(n / factor))) for n in size)
    t = F.interpolate(F.interpolate(t, size=small, mode="area"), size=size, mode="bilinear", align_corners=False)
    return t[0, 0].numpy() if image.ndim == 2 else t[:, 0].numpy()


def augment(image: np.ndarray, masks: Sequence[np.ndarray], names: Sequence[str], rng: np.random.Generator,
            probabilities: Dict[str, float] = None):
    """Augment a normalised image ((H, W) or (D, H, W)) and its masks; returns ``(image, [masks])``.

    ``names`` picks the transforms (``KNOWN``); each fires with its probability.
    """
    p = {**DEFAULT_PROBABILITIES, **(probabilities or {})}
    names = set(names)
    image = np.asarray(image, dtype=np.float32)
    masks = [np.asarray(m, dtype=np.float32) for m in masks]
    if "flip" in names or "mirror" in names:  # "mirror" is nnU-Net/MIScnn's name for it
        # left-right flip (x axis), and for 3D also anterior-posterior is not anatomical; flip x only
        if rng.random() < p["flip"]:
            image = image[..., ::-1]
            masks = [m[..., ::-1] for m in masks]
    do_rot = "rotate" in names and rng.random() < p["rotate"]
    do_scale = "scale" in names and rng.random() < p["scale"]
    if do_rot or do_scale:
        image, masks = _affine_plane(image, masks, rng, do_rot, do_scale)
    if "elastic" in names and rng.random() < p["elastic"]:
        image, masks = _elastic(image, masks, rng)
    if "lowres" in names and rng.random() < p["lowres"]:
        image = _low_resolution(image, rng.uniform(*LOWRES_FACTORS))
    lo, hi = float(image.min()), float(image.max())
    if "gamma" in names and rng.random() < p["gamma"] and hi > lo:
        g = rng.uniform(0.7, 1.5)
        image = lo + (hi - lo) * ((image - lo) / (hi - lo)) ** g
    if "brightness" in names and rng.random() < p["brightness"]:
        image = image + rng.uniform(-0.1, 0.1) * (hi - lo if hi > lo else 1.0)
    if "contrast" in names and rng.random() < p["contrast"]:
        mean = float(image.mean())
        image = (image - mean) * rng.uniform(0.75, 1.25) + mean
    if "noise" in names and rng.random() < p["noise"]:
        image = image + rng.normal(0.0, rng.uniform(0.0, 0.05) * (hi - lo if hi > lo else 1.0), image.shape)
    return (np.ascontiguousarray(image, dtype=np.float32),
            [np.ascontiguousarray(m > 0.5, dtype=np.float32) for m in masks])
