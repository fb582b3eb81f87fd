"""Intensity domains: what the numbers in a CT mean, and how one domain is mapped into another.

A chest CT reaches the program in one of two domains:

* ``"hu"``: Hounsfield units, a physical scale (air about -1000, water 0, bone several hundred);
  what a scanner, DICOM with its rescale, or a research NIfTI in HU holds.
* ``"display8"``: an 8-bit display image, 0..255, made by a publisher who windowed, equalised or
  compressed the CT for viewing (the PNG/JPG releases of COVID-19 data: MedSeg/Inf-Net JPGs in a
  lung window, the COVID-19-CT-Seg PNGs after per-slice min-max and CLAHE, the Radiopaedia
  volumes).  The publisher's mapping is not recorded, so **HU cannot be recovered** from such an
  image, and the same grey value can mean different HU in two slices.

A network is trained in one domain (stored in its checkpoint, see
:class:`napari_covidseg.preprocessing.Preprocessing`).  Mapping HU into the 8-bit display domain
is possible (we choose the windowing); mapping display values back into HU is not, and asking for
it raises :class:`DomainError` with that reason.

Two HU -> 8-bit mappings are provided.  :data:`LUNG_WINDOW` (W 1500 / L -600 -> 0..255, the
radiological lung window) is the one the shipped networks use: it maps the same HU to the same
grey value whatever the slice's content or resolution.  :data:`CT_SEG_PNG_RECIPE` repeats how the
largest public 8-bit set was made (Ma et al.'s COVID-19-CT-Seg as published by dstaroff: each slice
resampled to 256 x 256, min-max normalised to 0..255, then CLAHE with OpenCV clip limit 7 on
8 x 8 tiles); being adaptive, it turned the smooth parenchyma of a low-resolution CT into blotches
a network read as infection, so it is kept only as an option (``--hu-to-display8 recipe``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import InputError

HU = "hu"
DISPLAY8 = "display8"
DOMAINS = (HU, DISPLAY8)

#: layer metadata key of an image's intensity domain (copied to the layers derived from it)
DOMAIN_KEY = "covidseg_domain"

DOMAIN_TITLES = {HU: "CT in Hounsfield units", DISPLAY8: "8-bit display image (not HU)"}

#: HU values below this are padding outside the scanner's field of view (-2048, -3024), i.e. air
HU_AIR = -1024.0
#: the 12-bit CT range: values above it are metal artefacts or padding
HU_CEILING = 3071.0


class DomainError(InputError):
    """An image cannot be brought into the intensity domain a network needs."""


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown intensity domain {domain!r}; use {' or '.join(repr(d) for d in DOMAINS)}")
    return domain


def looks_like_display8(values: np.ndarray) -> bool:
    """True for integer-valued data inside 0..255 with some contrast (an 8-bit display image).

    A CT in HU always holds air (about -1000 HU), so it never fits 0..255.  Float data counts
    only when every value is a whole number (8-bit data saved as float by a converter).
    """
    values = np.asarray(values)
    if values.size == 0:
        return False
    if values.dtype == np.uint8:
        return int(values.max()) > int(values.min())
    lo, hi = float(values.min()), float(values.max())
    if not (0.0 <= lo and hi <= 255.0 and hi > lo):
        return False
    if np.issubdtype(values.dtype, np.integer):
        return True
    sample = values.reshape(-1)[:: max(1, values.size // 100_000)]
    return bool(np.all(sample == np.round(sample)))


#: suffix of the name of a layer that holds an 8-bit display image (a persistent "not HU" note)
DISPLAY8_LAYER_NOTE = " [8-bit, not HU]"


def domain_title(domain: str) -> str:
    return DOMAIN_TITLES[check_domain(domain)]


# ------------------------------------------------------------------------------------------------
# HU -> 8-bit display mappings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HUToDisplay8:
    """How a CT in HU becomes an 8-bit display image, as a network trained on 8-bit images expects.

    ``method``:
      ``"slice_minmax_clahe"``: each slice resampled to ``size`` (bilinear, antialiased), HU
      clipped to [-1024, 3071] (padding outside the field of view becomes air), min-max
      normalised to 0..255 and rounded, then CLAHE with ``clip_limit`` (skimage units: OpenCV's
      clipLimit / 256) on ``tiles`` x ``tiles`` tiles;
      ``"window"``: ``round(255 * (clip(HU, low, high) - low) / (high - low))``.
    """

    method: str = "slice_minmax_clahe"
    size: Optional[Tuple[int, int]] = (256, 256)
    clip_limit: float = 7.0 / 256.0
    tiles: int = 8
    low: float = -1350.0
    high: float = 150.0

    def __post_init__(self):
        if self.method not in ("slice_minmax_clahe", "window"):
            raise ValueError(f"unknown HU -> 8-bit method {self.method!r}; use 'slice_minmax_clahe' or 'window'")
        if self.method == "window" and not self.high > self.low:
            raise ValueError(f"window high ({self.high}) must be above low ({self.low})")

    def describe(self) -> str:
        if self.method == "window":
            width, level = self.high - self.low, (self.high + self.low) / 2.0
            return f"HU window W {width:g} / L {level:g} ({self.low:g}..{self.high:g} HU -> 0..255)"
        size = f"{self.size[0]}x{self.size[1]}, " if self.size else ""
        return (f"per slice: {size}min-max to 0..255, CLAHE (clip {self.clip_limit * 256:g}/256, "
                f"{self.tiles}x{self.tiles} tiles), as the COVID-19-CT-Seg PNG release")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "HUToDisplay8":
        d = dict(d or {})
        if d.get("size") is not None:
            d["size"] = tuple(int(v) for v in d["size"])
        return cls(**d)

    def output_shape(self, shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """(z, y, x) shape of the mapped volume of a CT of ``shape``."""
        if self.method == "slice_minmax_clahe" and self.size:
            return (int(shape[0]),) + tuple(int(s) for s in self.size)
        return tuple(int(s) for s in shape)

    def __call__(self, ct_hu: np.ndarray) -> np.ndarray:
        """The mapped (z, y', x') uint8 volume of a (z, y, x) CT in HU."""
        if self.method == "window":
            return window_to_display8(ct_hu, self.low, self.high)
        return slice_minmax_clahe(ct_hu, self.size, self.clip_limit, self.tiles)


#: the mapping stored in every network trained on the real 8-bit sets
CT_SEG_PNG_RECIPE = HUToDisplay8()
#: a plain radiological lung window (W 1500 / L -600)
LUNG_WINDOW = HUToDisplay8(method="window", size=None)


def window_to_display8(ct_hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """A HU array through the window [low, high] as 0..255 uint8."""
    x = np.clip(np.asarray(ct_hu, dtype=np.float32), low, high)
    return np.round((x - np.float32(low)) * np.float32(255.0 / (high - low))).astype(np.uint8)


def _resize_slices(volume: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    antialias = size[0] < volume.shape[1] or size[1] < volume.shape[2]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)[:, 0].numpy()


def slice_minmax_clahe(ct_hu: np.ndarray, size: Optional[Tuple[int, int]] = (256, 256),
                       clip_limit: float = 7.0 / 256.0, tiles: int = 8) -> np.ndarray:
    """The COVID-19-CT-Seg PNG recipe applied to a HU volume; returns (z, size...) uint8."""
    from skimage.exposure import equalize_adapthist

    volume = np.clip(np.asarray(ct_hu, dtype=np.float32), HU_AIR, HU_CEILING)
    if size is not None and tuple(volume.shape[1:]) != tuple(size):
        volume = _resize_slices(volume, size)
    out = np.empty(volume.shape, dtype=np.uint8)
    kernel = (max(1, volume.shape[1] // tiles), max(1, volume.shape[2] // tiles))
    for k, sl in enumerate(volume):
        lo, hi = float(sl.min()), float(sl.max())
        if hi <= lo:
            out[k] = 0
            continue
        eight_bit = np.round((sl - lo) * (255.0 / (hi - lo))) / 255.0
        out[k] = np.round(equalize_adapthist(eight_bit, kernel_size=kernel, clip_limit=clip_limit, nbins=256) * 255.0)
    return out


def to_display8(image: np.ndarray, domain: str, mapping: HUToDisplay8) -> np.ndarray:
    """``image`` in the 8-bit display domain: as is when it already is, else through ``mapping``."""
    if check_domain(domain) == DISPLAY8:
        return np.asarray(image)
    return mapping(image)


def refuse_display_for_hu_network(what: str = "This network") -> None:
    """Raise the one message for an 8-bit image given to a network that needs HU."""
    raise DomainError(
        f"{what} was trained on CT in Hounsfield units and this image is an 8-bit display image (0..255): "
        "the publisher's windowing is not recorded, so HU cannot be recovered from it and the network would "
        "see intensities it never learnt. Use a network trained on 8-bit images (the shipped real-data "
        "weights are), or open the CT in HU (e.g. the original DICOM)."
    )
