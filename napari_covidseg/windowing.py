"""CT display windows: which Hounsfield range is stretched over black..white.

A window is given the radiologists' way, as width W and level (centre) L in HU; the display maps
``L - W/2`` to black and ``L + W/2`` to white, which is napari's ``contrast_limits``.  The lung
window (W 1500, L -600) is where ground-glass opacities and consolidations are read, so it is
the default for every CT the plugin opens; mediastinum and bone help check effusions and ribs.

An 8-bit display image (domain ``"display8"``) was already windowed by its publisher, so HU
windows mean nothing for it: it gets :data:`DISPLAY_PRESETS` instead, contrast stretches of its
0..255 values ("as published" shows it exactly as released).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class WindowPreset:
    """A named CT window: ``width`` and ``level`` in HU."""

    name: str
    width: float
    level: float

    @property
    def contrast_limits(self) -> Tuple[float, float]:
        return (self.level - self.width / 2.0, self.level + self.width / 2.0)


WINDOW_PRESETS: Dict[str, WindowPreset] = {
    preset.name: preset
    for preset in (
        WindowPreset("lung", width=1500.0, level=-600.0),
        WindowPreset("mediastinum", width=400.0, level=40.0),
        WindowPreset("soft tissue", width=350.0, level=50.0),
        WindowPreset("bone", width=1800.0, level=400.0),
    )
}

DEFAULT_PRESET = "lung"

#: presets of 8-bit display images (width and level in grey values 0..255)
DISPLAY_PRESETS: Dict[str, WindowPreset] = {
    preset.name: preset
    for preset in (
        WindowPreset("as published", width=255.0, level=127.5),
        WindowPreset("more contrast", width=170.0, level=127.5),
        WindowPreset("brighter", width=180.0, level=90.0),
        WindowPreset("darker", width=180.0, level=165.0),
    )
}
DEFAULT_DISPLAY_PRESET = "as published"


def presets_for(domain: str = "hu") -> Dict[str, WindowPreset]:
    """The presets that mean something for images of ``domain`` (``"hu"`` or ``"display8"``)."""
    return DISPLAY_PRESETS if domain == "display8" else WINDOW_PRESETS


def default_contrast_limits(domain: str = "hu") -> Tuple[float, float]:
    """Contrast limits an image of ``domain`` opens with (lung window, or 0..255 as published)."""
    return (DISPLAY_PRESETS[DEFAULT_DISPLAY_PRESET] if domain == "display8" else WINDOW_PRESETS[DEFAULT_PRESET]).contrast_limits


def get_preset(preset, domain: str = "hu") -> WindowPreset:
    """The :class:`WindowPreset` named ``preset`` (case-insensitive) among ``domain``'s presets,
    or a preset passed through."""
    if isinstance(preset, WindowPreset):
        return preset
    presets = presets_for(domain)
    key = str(preset).strip().lower().replace("_", " ")
    if key not in presets:
        raise KeyError(f"Unknown window {preset!r}; choose one of: {', '.join(presets)}.")
    return presets[key]


def contrast_limits(preset=DEFAULT_PRESET, domain: str = "hu") -> Tuple[float, float]:
    """napari ``contrast_limits`` (low, high) of a preset name, e.g. ``"lung"`` -> (-1350, 150) HU."""
    return get_preset(preset, domain).contrast_limits


def width_level(limits) -> Tuple[float, float]:
    """(width, level) of napari contrast limits (low, high)."""
    low, high = (float(v) for v in limits)
    return high - low, (high + low) / 2.0


def matching_preset(limits, tolerance: float = 0.5, domain: str = "hu"):
    """Name of the preset of ``domain`` whose contrast limits equal ``limits`` (within ``tolerance``), else None."""
    low, high = (float(v) for v in limits)
    for name, preset in presets_for(domain).items():
        p_low, p_high = preset.contrast_limits
        if abs(p_low - low) <= tolerance and abs(p_high - high) <= tolerance:
            return name
    return None
