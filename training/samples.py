"""Training samples: cases brought onto the network's grid and domain, and the per-epoch sampler.

Reproducibility: sample ``i`` of epoch ``e`` (which case, which slice or patch, which crop, its
augmentation) is a pure function of ``(seed, e, i)``, so a resumed run sees exactly the samples an
uninterrupted run would have seen.

Every sample is ``(x, y, w)``: the network input ``(1, ...)``, the target ``(2, ...)`` (lung,
infection) and a label weight ``(2, ...)``: 1 where the label is known, 0 where the case has no
such mask, the channel is not trained, or the voxel is padding added to a case thinner than the
patch.  The networks' losses ignore weight-0 voxels (:mod:`napari_covidseg.models.losses`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from napari_covidseg.preprocessing import Preprocessing, in_network_domain, normalise

from .augment import augment
from .datasets import Case

CHANNELS = {"lung": [0], "infection": [1], "both": [0, 1]}


def _resize(x: np.ndarray, shape, mode: str) -> np.ndarray:
    """Resize a (z, y, x) array to ``shape`` ((y, x) keeps z; (z, y, x) resamples all three)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if len(shape) == 2:
        out = F.interpolate(t[:, None], size=tuple(shape), mode=mode, **({"align_corners": False} if mode != "nearest" else {}))
        return out[:, 0].numpy()
    kw = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(t[None, None], size=tuple(shape), mode=mode, **kw)[0, 0].numpy()


def _mask_to(mask: np.ndarray, shape) -> np.ndarray:
    """A binary mask resampled (linear, then > 0.5) to ``shape``."""
    if tuple(mask.shape[-len(shape):]) == tuple(shape):
        return mask
    return (_resize(mask, shape, "bilinear" if len(shape) == 2 else "trilinear") > 0.5).astype(np.uint8)


class PreparedCase:
    """A case as the network sees it: normalised image, uint8 (2, ...) target and which labels are known."""

    def __init__(self, case: Case, prep: Preprocessing, dims: int, channels: Sequence[int] = (0, 1)):
        image = in_network_domain(case.ct, prep, case.domain)  # may change the in-plane size (HU -> 8-bit)
        if prep.inplane_size is not None:  # 2D networks, and 3D networks on 8-bit data: slices resized
            grid = tuple(int(v) for v in prep.inplane_size)
        elif dims == 3 and prep.target_spacing is not None:
            spacing = (case.spacing[0],) + tuple(s * n / m for s, n, m in zip(case.spacing[1:], case.ct.shape[1:], image.shape[1:]))
            grid = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(image.shape, spacing, prep.target_spacing))
        else:
            grid = tuple(image.shape[1:])
        if tuple(image.shape[-len(grid):]) != grid:
            image = _resize(image, grid, "bilinear" if len(grid) == 2 else "trilinear")
        self.image = normalise(image, prep).astype(np.float32, copy=False)
        shape = self.image.shape
        self.known = np.array([float(c in channels and m is not None) for c, m in enumerate((case.lung, case.infection))],
                              dtype=np.float32)
        self.target = np.zeros((2,) + shape, dtype=np.uint8)
        for c, mask in enumerate((case.lung, case.infection)):
            if mask is not None and self.known[c]:
                self.target[c] = _mask_to((mask > 0).astype(np.uint8), shape[-len(grid):])
        self.case_id, self.source = case.case_id, case.source
        labelled = self.target.max(0).reshape(shape[0], -1).any(1)
        self.lung_slices = np.flatnonzero(labelled)
        self.foreground = None
        if dims == 3:
            fg = np.argwhere(self.target.max(0) > 0)
            self.foreground = fg[:: max(1, len(fg) // 20000)] if len(fg) else fg

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])


def case_probabilities(cases: Sequence[PreparedCase], source_shares: Optional[dict] = None) -> np.ndarray:
    """Probability of drawing each case: its source's share, split by slices within the source
    (without shares: every slice equally likely)."""
    slices = np.array([c.n_slices for c in cases], dtype=np.float64)
    if not source_shares:
        return slices / slices.sum()
    p = np.zeros(len(cases))
    for source, share in source_shares.items():
        mine = np.array([c.source == source for c in cases])
        if mine.any():
            p[mine] = share * slices[mine] / slices[mine].sum()
    if p.sum() <= 0:
        return slices / slices.sum()
    return p / p.sum()


def _crop_start(rng, size: int, crop: int, centre: Optional[int] = None) -> int:
    if crop >= size:
        return 0
    if centre is None:
        return int(rng.integers(size - crop + 1))
    return int(np.clip(centre - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, size - crop))


def _pad_to(image: np.ndarray, masks: List[np.ndarray], valid: np.ndarray, size: Sequence[int]):
    """Pad (edge for the image, 0 for masks and ``valid``) so every axis reaches ``size``."""
    pads = [(0, max(0, int(s) - n)) for s, n in zip(size, image.shape)]
    if not any(p[1] for p in pads):
        return image, masks, valid
    return (np.pad(image, pads, mode="edge"), [np.pad(m, pads) for m in masks], np.pad(valid, pads))


class SampleDataset(Dataset):
    """``length`` training samples per epoch; sample ``i`` of epoch ``e`` is a pure function of (seed, e, i).

    2D: a slice (from slices with a label with probability ``lung_weight``), cropped to
    ``crop_size`` when that is smaller than the slice.  3D: a patch of ``input_size`` centred on a
    labelled voxel with probability ``lung_weight``; a case thinner than the patch is padded and
    its padding masked out of the loss.
    """

    def __init__(self, cases: List[PreparedCase], dims: int, input_size: Sequence[int], augmentation: Sequence[str],
                 probabilities: dict, length: int, seed: int, lung_weight: float,
                 crop_size: Optional[Sequence[int]] = None, source_shares: Optional[dict] = None):
        self.cases, self.dims, self.aug, self.probs = cases, dims, list(augmentation), dict(probabilities or {})
        self.length, self.seed, self.lung_weight = int(length), int(seed), float(lung_weight)
        self.epoch = 0
        self.input_size = tuple(int(s) for s in (crop_size or input_size))
        self.case_p = case_probabilities(cases, source_shares)

    def __len__(self):
        return self.length

    def _region(self, rng, case: PreparedCase):
        shape = case.image.shape
        if self.dims == 2:
            if len(case.lung_slices) and rng.random() < self.lung_weight:
                z = int(rng.choice(case.lung_slices))
            else:
                z = int(rng.integers(shape[0]))
            starts = [_crop_start(rng, n, p) for n, p in zip(shape[1:], self.input_size)]
            return (z,) + tuple(slice(s, s + p) for s, p in zip(starts, self.input_size))
        centre = None
        if case.foreground is not None and len(case.foreground) and rng.random() < self.lung_weight:
            centre = case.foreground[int(rng.integers(len(case.foreground)))]
        starts = [_crop_start(rng, n, p, None if centre is None else int(c)) for n, p, c in
                  zip(shape, self.input_size, centre if centre is not None else [None] * 3)]
        return tuple(slice(s, s + p) for s, p in zip(starts, self.input_size))

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        case = self.cases[int(rng.choice(len(self.cases), p=self.case_p))]
        region = self._region(rng, case)
        image = case.image[region]
        masks = [case.target[0][region].astype(np.float32), case.target[1][region].astype(np.float32)]
        valid = np.ones(image.shape, dtype=np.float32)
        image, masks, valid = _pad_to(image, masks, valid, self.input_size)
        padded = not valid.all()
        if self.aug:
            image, moved = augment(image, masks + ([valid] if padded else []), self.aug, rng, self.probs)
            masks, valid = moved[:2], (moved[2] if padded else valid)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        y = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in masks]))
        w = torch.from_numpy(case.known.reshape((2,) + (1,) * valid.ndim) * valid[None]).expand_as(y).contiguous()
        return x, y, w
