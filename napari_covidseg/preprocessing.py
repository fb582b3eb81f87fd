"""The one preprocessing function shared by training and inference.

A :class:`Preprocessing` is stored inside every checkpoint, so a network is always fed the same
intensities at inference as during training.  It maps a CT in Hounsfield units to the float
input of a network: clip to a HU window, then normalise either to [0, 1] (``"minmax"``) or to zero
mean and unit variance of the clipped voxels (``"zscore"``, computed per volume or per patch, as
the QC-HC paper's MIScnn pipeline does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """How HU become network input.

    Attributes
    ----------
    hu_min, hu_max:
        Clip window in HU.
    normalisation:
        ``"minmax"``: (clip - hu_min) / (hu_max - hu_min), in [0, 1].
        ``"zscore"``: (clip - mean) / std of the clipped array (std floored at 1 HU).
    inplane_size:
        For 2D networks: slices are resized to this (H, W) before the network and predictions are
        resized back.  ``None`` keeps the native in-plane size (padded to a multiple of the
        network's stride by the inference code).
    target_spacing:
        For 3D networks: (z, y, x) voxel spacing in mm to resample to before the network, or
        ``None`` to keep the native spacing.
    """

    hu_min: float = -1250.0
    hu_max: float = 250.0
    normalisation: str = "minmax"
    inplane_size: Optional[Tuple[int, int]] = None
    target_spacing: Optional[Tuple[float, float, float]] = None

    def __post_init__(self):
        if self.hu_max <= self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")
        if self.normalisation not in ("minmax", "zscore"):
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'minmax' or 'zscore'")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("inplane_size", "target_spacing"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        for key in ("inplane_size", "target_spacing"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def preprocess(ct_hu: Array, spec: Preprocessing) -> Array:
    """Clip and normalise a CT (any shape) in HU; returns float32 of the same type and shape."""
    if isinstance(ct_hu, torch.Tensor):
        x = ct_hu.float().clamp(spec.hu_min, spec.hu_max)
        if spec.normalisation == "minmax":
            return (x - spec.hu_min) / (spec.hu_max - spec.hu_min)
        return (x - x.mean()) / x.std().clamp_min(1.0)
    x = np.clip(np.asarray(ct_hu, dtype=np.float32), spec.hu_min, spec.hu_max)
    if spec.normalisation == "minmax":
        return (x - np.float32(spec.hu_min)) / np.float32(spec.hu_max - spec.hu_min)
    return ((x - x.mean()) / max(float(x.std()), 1.0)).astype(np.float32)
