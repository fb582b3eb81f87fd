"""CT display windows: which Hounsfield range is stretched over black..white.

A window is given the radiologists' way, as width W and level (centre) L in HU; the display maps
``L - W/2`` to black and ``L + W/2`` to white, which is napari's ``contrast_limits``.  The lung
window (W 1500, L -600) is where ground-glass opacities and consolidations are read, so it is
the default for every CT the plugin opens; mediastinum and bone help check effusions and ribs.
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


def get_preset(preset) -> WindowPreset:
    """The :class:`WindowPreset` named ``preset`` (case-insensitive), or a preset passed through."""
    if isinstance(preset, WindowPreset):
        return preset
    key = str(preset).strip().lower().replace("_", " ")
    if key not in WINDOW_PRESETS:
        raise KeyError(f"Unknown CT window {preset!r}; choose one of: {', '.join(WINDOW_PRESETS)}.")
    return WINDOW_PRESETS[key]


def contrast_limits(preset=DEFAULT_PRESET) -> Tuple[float, float]:
    """napari ``contrast_limits`` (low, high) in HU of a preset name, e.g. ``"lung"`` -> (-1350, 150)."""
    return get_preset(preset).contrast_limits


def width_level(limits) -> Tuple[float, float]:
    """(width, level) of napari contrast limits (low, high)."""
    low, high = (float(v) for v in limits)
    return high - low, (high + low) / 2.0


def matching_preset(limits, tolerance: float = 0.5):
    """Name of the preset whose contrast limits equal ``limits`` (within ``tolerance`` HU), else None."""
    low, high = (float(v) for v in limits)
    for name, preset in WINDOW_PRESETS.items():
        p_low, p_high = preset.contrast_limits
        if abs(p_low - low) <= tolerance and abs(p_high - high) <= tolerance:
            return name
    return None
