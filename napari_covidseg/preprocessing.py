"""The one preprocessing function shared by training and inference.

A :class:`Preprocessing` is stored inside every checkpoint, so a network is always fed the same
intensities at inference as during training.  It records the **intensity domain** the network was
trained in (see :mod:`napari_covidseg.intensity`) and how an image of the other domain is brought
into it:

* a network trained on CT in HU (``domain="hu"``) clips HU to ``[hu_min, hu_max]``; it cannot read
  an 8-bit display image (HU cannot be recovered from one) and says so;
* a network trained on 8-bit display images (``domain="display8"``) reads 0..255 as is and maps a
  CT in HU through ``hu_to_display8`` (:class:`~napari_covidseg.intensity.HUToDisplay8`, e.g. the
  COVID-19-CT-Seg PNG recipe or a lung window) first.

The result is then normalised to [0, 1] (``"minmax"``: the clip window, or 0..255) or to zero mean
and unit variance (``"zscore"``, per volume or per patch, as QC-HC's MIScnn pipeline does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch

from .intensity import DISPLAY8, HU, HUToDisplay8, check_domain, refuse_display_for_hu_network

Array = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes network input.

    Attributes
    ----------
    hu_min, hu_max:
        Clip window in HU (networks trained in HU).
    normalisation:
        ``"minmax"``: to [0, 1] ((clip - hu_min) / (hu_max - hu_min) in HU, value / 255 in 8-bit).
        ``"zscore"``: (x - mean) / std of the array (std floored at 1 HU, or 1/255 in 8-bit).
    inplane_size:
        Slices are resized to this (H, W) before the network and predictions are resized back.
        ``None`` keeps the native in-plane size (padded to a multiple of the network's stride).
    target_spacing:
        For 3D networks trained in HU: (z, y, x) voxel spacing in mm to resample to, or ``None``.
    domain:
        ``"hu"`` or ``"display8"``: the intensity domain the network was trained in.
    hu_to_display8:
        For ``domain="display8"``: :meth:`HUToDisplay8.to_dict` of the mapping applied to a CT in HU.
    """

    hu_min: float = -1250.0
    hu_max: float = 250.0
    normalisation: str = "minmax"
    inplane_size: Optional[Tuple[int, int]] = None
    target_spacing: Optional[Tuple[float, float, float]] = None
    domain: str = HU
    hu_to_display8: Optional[dict] = None

    def __post_init__(self):
        if self.hu_max <= self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must be above hu_min ({self.hu_min})")
        if self.normalisation not in ("minmax", "zscore"):
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'minmax' or 'zscore'")
        check_domain(self.domain)
        if self.domain == DISPLAY8:
            HUToDisplay8.from_dict(self.hu_to_display8)  # validates

    @property
    def mapping(self) -> Optional[HUToDisplay8]:
        """The HU -> 8-bit mapping of a display-domain network (``None`` for a HU network)."""
        return HUToDisplay8.from_dict(self.hu_to_display8) if self.domain == DISPLAY8 else None

    def check_can_read(self, domain: str, what: str = "This network") -> None:
        """Raise :class:`~napari_covidseg.intensity.DomainError` when images of ``domain`` cannot be
        brought into this network's domain (8-bit display images for a network trained in HU)."""
        if self.domain == HU and check_domain(domain) == DISPLAY8:
            refuse_display_for_hu_network(what)

    def describe_domains(self) -> str:
        """One line for model cards and the GUI: what the network reads and how the other domain gets in."""
        if self.domain == HU:
            return (f"trained on CT in HU (window {self.hu_min:g}..{self.hu_max:g} HU); 8-bit display images "
                    "cannot be mapped into HU and are refused")
        return f"trained on 8-bit display images; a CT in HU is mapped {self.mapping.describe()}"

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
        return cls(**d)  # checkpoints without a domain were all trained in HU (the default)


def in_network_domain(image: np.ndarray, spec: Preprocessing, domain: str = HU) -> np.ndarray:
    """``image`` (z, y, x) or (y, x) brought into the network's domain, not yet normalised.

    A HU CT given to an 8-bit network is mapped (the in-plane size may change, e.g. to 256 x 256);
    an 8-bit image given to a HU network raises :class:`~napari_covidseg.intensity.DomainError`.
    """
    spec.check_can_read(domain)
    if spec.domain == domain:
        return np.asarray(image)
    image = np.asarray(image)
    mapped = spec.mapping(image[None] if image.ndim == 2 else image)
    return mapped[0] if image.ndim == 2 else mapped


def domain_range(spec: Preprocessing) -> Tuple[float, float, float]:
    """(low, high, std floor) of the values the network reads: the HU window, or 0..255 in 8-bit."""
    if spec.domain == DISPLAY8:
        return 0.0, 255.0, 1.0 / 255.0
    return float(spec.hu_min), float(spec.hu_max), 1.0


def clip_to_domain(x, spec: Preprocessing) -> np.ndarray:
    """``x`` (already in the network's domain) as float32, clipped to :func:`domain_range`."""
    lo, hi, _ = domain_range(spec)
    return np.clip(np.asarray(x, dtype=np.float32), lo, hi)


def zscore_stats(chunks: Iterable, spec: Preprocessing) -> Tuple[float, float]:
    """(mean, std) of the clipped values of a volume given as chunks of slices (``"zscore"``).

    The chunks together are the whole volume, so the statistics are those of the volume (float64
    accumulation, chunks combined exactly, population std floored as :func:`normalise` does);
    a volume never needs to be in memory as float32 at once to be normalised.
    """
    n, mean, m2 = 0, 0.0, 0.0
    for chunk in chunks:
        values = clip_to_domain(chunk, spec).astype(np.float64)
        if spec.domain == DISPLAY8:
            values /= 255.0
        k = values.size
        if k == 0:
            continue
        chunk_mean = float(values.mean())
        chunk_m2 = float(np.square(values - chunk_mean).sum())
        delta = chunk_mean - mean
        total = n + k
        mean += delta * k / total
        m2 += chunk_m2 + delta * delta * n * k / total
        n = total
    floor = domain_range(spec)[2]
    return mean, max(float(np.sqrt(m2 / n)) if n else 0.0, floor)


def normalise(x: Array, spec: Preprocessing, stats: Optional[Tuple[float, float]] = None) -> Array:
    """Network input of values already in the network's domain; float32 of the same type and shape.

    ``stats`` = (mean, std) from :func:`zscore_stats` normalises a part of a volume (a batch of
    slices) with the statistics of the whole; without it ``"zscore"`` uses ``x``'s own.
    """
    lo, hi, floor = domain_range(spec)
    if isinstance(x, torch.Tensor):
        x = x.float().clamp(lo, hi)
        if spec.normalisation == "minmax":
            return (x - lo) / (hi - lo)
        x = x / 255.0 if spec.domain == DISPLAY8 else x
        if stats is not None:
            return (x - stats[0]) / stats[1]
        return (x - x.mean()) / x.std().clamp_min(floor)
    x = clip_to_domain(x, spec)
    if spec.normalisation == "minmax":
        return (x - np.float32(lo)) / np.float32(hi - lo)
    x = x / np.float32(255.0) if spec.domain == DISPLAY8 else x
    mean, std = stats if stats is not None else (x.mean(), max(float(x.std()), floor))
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def preprocess(image: Array, spec: Preprocessing, domain: str = HU) -> Array:
    """Bring ``image`` (in ``domain``) into the network's domain and normalise it (float32)."""
    if isinstance(image, torch.Tensor) and domain == spec.domain:
        return normalise(image, spec)
    return normalise(in_network_domain(np.asarray(image), spec, domain), spec)
