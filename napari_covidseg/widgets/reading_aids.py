"""What a radiologist expects on the canvas: orientation letters, slice position, value under the
cursor, and one-click axial / coronal / sagittal views.

Display arrays are (z, y, x) with x toward the patient's left, y toward posterior and z toward
superior (``io/geometry.py``), so each view has fixed letters:

=========  ==================  =============  ==============
view       sliced along         screen left    screen top
=========  ==================  =============  ==============
axial      z (inferior->sup.)  R              A
coronal    y (ant.->post.)     R              S
sagittal   x (right->left)     A              S
=========  ==================  =============  ==============

In coronal and sagittal views the vertical axis is flipped (``orientation2d = ("up", "right")``)
so the head is at the top.  Everything is drawn with napari canvas text overlays owned by this
module (keys ``covidseg_*``), so the user's own text overlay is left alone.
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import numpy as np

from ..intensity import DISPLAY8
from ..io.geometry import GEOMETRY_KEY, SPACING_KNOWN_KEY, Geometry

#: view -> (dims order of the last three axes, 2D orientation, markers (top, bottom, left, right))
VIEWS = {
    "axial": ((0, 1, 2), ("down", "right"), ("A", "P", "R", "L")),
    "coronal": ((1, 0, 2), ("up", "right"), ("S", "I", "R", "L")),
    "sagittal": ((2, 0, 1), ("up", "right"), ("S", "I", "A", "P")),
}
#: sliced axis of each view -> (RAS component, letter for +, letter for -)
POSITION_AXES = {"axial": (2, "S", "I"), "coronal": (1, "A", "P"), "sagittal": (0, "L", "R")}
MARKER_POSITIONS = ("top_center", "bottom_center", "middle_left", "middle_right")
MARKER_KEY = "covidseg_marker_"
SLICE_KEY = "covidseg_slice"
CURSOR_KEY = "covidseg_cursor"
MARKER_COLOR = (1.0, 0.85, 0.2, 1.0)
_AIDS = weakref.WeakKeyDictionary()


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def display_to_ras(geometry: Geometry, zyx) -> np.ndarray:
    """World RAS+ position (mm) of the display index ``zyx`` (fractional indices allowed)."""
    from nibabel.orientations import inv_ornt_aff

    reoriented = np.array([zyx[2], zyx[1], zyx[0], 1.0], dtype=float)
    to_file = inv_ornt_aff(geometry._file_to_display_ornt, geometry.file_shape)
    return (geometry.affine @ to_file @ reoriented)[:3]


def slice_position_text(view: str, geometry: Optional[Geometry], zyx) -> str:
    """``"S 45.0 mm"``: where the slice through display index ``zyx`` lies along the view's axis."""
    if geometry is None:
        return ""
    component, plus, minus = POSITION_AXES[view]
    value = float(display_to_ras(geometry, zyx)[component])
    if component == 0:  # RAS x grows toward the patient's right
        value = -value
    return f"{plus if value >= 0 else minus} {abs(value):.1f} mm"


def value_text(layer, value, domain: str) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return f"{float(value):.0f} (8-bit value)" if domain == DISPLAY8 else f"{float(value):.0f} HU"


def reference_image(viewer):
    """The CT the read-outs describe: the top visible image with CT geometry, else any image."""
    from napari.layers import Image

    images = [layer for layer in viewer.layers if isinstance(layer, Image) and layer.ndim >= 3]
    for layer in reversed(images):
        if layer.visible and GEOMETRY_KEY in (layer.metadata or {}):
            return layer
    return images[-1] if images else None


class ReadingAids:
    """Orientation markers, slice line and cursor value on one viewer (one instance per viewer:
    use :func:`reading_aids`)."""

    def __init__(self, viewer):
        from napari.components.overlays import TextOverlay

        self._viewer_ref = weakref.ref(viewer)
        self.view = "axial"
        self.enabled = True
        overlays = viewer.canvas.overlays
        for position in MARKER_POSITIONS:
            overlays[MARKER_KEY + position] = TextOverlay(position=position, font_size=14, color=MARKER_COLOR,
                                                         visible=False)
        overlays[SLICE_KEY] = TextOverlay(position="top_left", font_size=10, visible=False)
        overlays[CURSOR_KEY] = TextOverlay(position="bottom_left", font_size=10, visible=False)
        viewer.dims.events.current_step.connect(self.update_slice)
        viewer.dims.events.order.connect(self._order_changed)
        viewer.layers.events.inserted.connect(self.update)
        viewer.layers.events.removed.connect(self.update)
        viewer.mouse_move_callbacks.append(self._mouse_moved)
        viewer.canvas.grid.events.enabled.connect(self.update)
        self.update()

    @property
    def viewer(self):
        return self._viewer_ref()

    def overlay(self, key):
        return self.viewer.canvas.overlays[key]

    # --- views ---------------------------------------------------------------------------------
    def set_view(self, view: str) -> None:
        """Show the CT axially, coronally or sagittally (same voxel under the centre of the screen)."""
        viewer = self.viewer
        order, orientation, _ = VIEWS[view]
        lead = tuple(range(viewer.dims.ndim - 3))
        self.view = view
        viewer.dims.order = lead + tuple(len(lead) + axis for axis in order)
        camera(viewer).orientation2d = orientation
        viewer.reset_view()
        self.update()

    def _order_changed(self, event=None):
        """A dims order set by napari itself (transpose button) names no view we know: no letters."""
        viewer = self.viewer
        order = tuple(viewer.dims.order)[-3:]
        base = viewer.dims.ndim - 3
        known = [name for name, (o, _, _) in VIEWS.items() if tuple(base + a for a in o) == order]
        self.view = known[0] if known else None
        self.update()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.update()

    # --- text ----------------------------------------------------------------------------------
    def update(self, event=None) -> None:
        viewer = self.viewer
        if viewer is None:
            return
        show = self.enabled and self.view is not None and reference_image(viewer) is not None
        # in grid mode (side by side) the letters at the canvas edges would sit on the tiles' titles
        # and label one tile's edge only; the slice line moves out of the first tile's title
        gridded = bool(viewer.canvas.grid.enabled)
        markers = VIEWS[self.view][2] if self.view else ("",) * 4
        for position, letter in zip(MARKER_POSITIONS, markers):
            overlay = self.overlay(MARKER_KEY + position)
            overlay.text = letter
            overlay.visible = show and not gridded
        self.overlay(SLICE_KEY).position = "bottom_right" if gridded else "top_left"
        self.update_slice()
        if not show:
            self.overlay(CURSOR_KEY).visible = False

    def slice_text(self) -> str:
        """``"Axial 12 [0-47] · S 45.0 mm"`` for the slice on screen: the index napari's slider and
        the Compare widget show, the range, and where the slice lies in the patient."""
        viewer, layer = self.viewer, reference_image(self.viewer)
        if layer is None or self.view is None:
            return ""
        data_point = layer.world_to_data(viewer.dims.point)
        index = [float(v) for v in data_point[-3:]]
        sliced = VIEWS[self.view][0][0]
        count = layer.data.shape[-3 + sliced]
        current = int(np.clip(round(index[sliced]), 0, count - 1))
        text = f"{self.view.capitalize()} {current} [0-{count - 1}]"
        geometry = (layer.metadata or {}).get(GEOMETRY_KEY)
        known = (layer.metadata or {}).get(SPACING_KNOWN_KEY, True)
        if isinstance(geometry, Geometry) and known:
            centre = [(s - 1) / 2.0 for s in layer.data.shape[-3:]]
            centre[sliced] = current
            text += " · " + slice_position_text(self.view, geometry, centre)
        return text

    def update_slice(self, event=None) -> None:
        text = self.slice_text() if self.enabled else ""
        overlay = self.overlay(SLICE_KEY)
        overlay.text = text
        overlay.visible = bool(text)

    def cursor_text(self, position) -> str:
        """The CT value under ``position`` (world coordinates), in HU or as an 8-bit value."""
        from .common import layer_domain

        layer = reference_image(self.viewer)
        if layer is None:
            return ""
        index = np.round(np.asarray(layer.world_to_data(position), dtype=float)[-3:]).astype(int)
        shape = layer.data.shape[-3:]
        if np.any(index < 0) or np.any(index >= np.asarray(shape)):
            return ""
        value = np.asarray(layer.data[(Ellipsis, *index)]) if layer.data.ndim == 3 else None
        text = value_text(layer, None if value is None else float(value), layer_domain(layer))
        return f"{text} at x {index[2]}, y {index[1]}, z {index[0]}" if text else ""

    def _mouse_moved(self, viewer, event) -> None:
        if not self.enabled:
            return
        text = self.cursor_text(viewer.cursor.position)
        overlay = self.overlay(CURSOR_KEY)
        overlay.text = text
        overlay.visible = bool(text)


def reading_aids(viewer) -> ReadingAids:
    """The viewer's :class:`ReadingAids`, installed on first use."""
    aids = _AIDS.get(viewer)
    if aids is None:
        aids = _AIDS[viewer] = ReadingAids(viewer)
    return aids


def markers_of(viewer) -> Tuple[str, str, str, str]:
    """The letters on screen (top, bottom, left, right); empty strings when hidden."""
    overlays = viewer.canvas.overlays
    return tuple(overlays[MARKER_KEY + p].text if overlays[MARKER_KEY + p].visible else "" for p in MARKER_POSITIONS)
