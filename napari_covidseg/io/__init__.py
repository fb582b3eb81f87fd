"""Reading and writing chest CT and masks with their geometry intact."""

from .geometry import DISPLAY_AXCODES, GEOMETRY_KEY, Geometry  # noqa: F401
