"""Dock widget: switch a CT's display window (lung, mediastinum, soft tissue, bone) in one click.

Reading COVID-19 CT needs the lung window for ground-glass opacities and the mediastinum window
for consolidation and effusion; in grid mode (Side by side) a preset changes every tile that
shows the CT.  Radiologists think in width/level, not napari's contrast limits,
so the widget shows and accepts W/L and keeps its read-out in step with napari's own contrast
slider.  For an 8-bit display image (not HU) the buttons are display presets and W/L are grey
values 0..255, with a line saying so.
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QButtonGroup,
    QDoubleSpinBox,
    QGridLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..intensity import DISPLAY8, HU
from ..io.geometry import GEOMETRY_KEY
from ..windowing import contrast_limits, matching_preset, presets_for, width_level
from .common import LayerComboBox, form_layout, image_layers, layer_domain

UNITS = {HU: " HU", DISPLAY8: ""}


def same_ct_layers(viewer, layer) -> list:
    """``layer`` and every image layer showing the same array (the Side-by-side grid tiles share
    the CT's array), so a preset changes what the user sees in every tile."""
    return [layer] + [other for other in image_layers(viewer) if other is not layer and other.data is layer.data]


def _is_ct(layer) -> bool:
    return GEOMETRY_KEY in getattr(layer, "metadata", {})


class WindowWidget(QWidget):
    """Preset buttons and width/level boxes acting on the chosen CT Image layer."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._watched = None

        self.layer_combo = LayerComboBox(napari_viewer, image_layers, prefer=_is_ct)
        self.domain = None
        self.buttons = {}
        self.button_group = QButtonGroup(self)
        self.button_group.setExclusive(True)
        grid = self.button_grid = QGridLayout()
        self.domain_note = QLabel()
        self.domain_note.setWordWrap(True)
        self.domain_note.setStyleSheet("color: #d08000;")

        self.width_box = QDoubleSpinBox()
        self.width_box.setRange(1.0, 10000.0)
        self.width_box.setDecimals(0)
        self.level_box = QDoubleSpinBox()
        self.level_box.setRange(-3000.0, 5000.0)
        self.level_box.setDecimals(0)
        for box in (self.width_box, self.level_box):
            box.setKeyboardTracking(False)
            box.valueChanged.connect(self._apply_boxes)
        self.readout = QLabel()

        form = form_layout([("CT layer", self.layer_combo), ("Width", self.width_box), ("Level", self.level_box)])
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.domain_note)
        layout.addLayout(grid)
        layout.addWidget(self.readout)
        layout.addStretch(1)

        self.layer_combo.currentIndexChanged.connect(self._watch_layer)
        napari_viewer.layers.selection.events.active.connect(self._follow_active_layer)
        self._set_domain(HU)
        self._watch_layer()

    # --- public API ---------------------------------------------------------------------------
    def current_layer(self):
        return self.layer_combo.current_layer()

    def apply_preset(self, name: str) -> None:
        """Set the chosen CT layer's contrast limits to the preset's window (a preset of its domain)."""
        self.set_limits(contrast_limits(name, self.domain))

    def set_width_level(self, width: float, level: float) -> None:
        self.set_limits((level - width / 2.0, level + width / 2.0))

    def set_limits(self, limits) -> None:
        layer = self.current_layer()
        if layer is None:
            self.readout.setText("Open a CT (File > Open, or the phantom sample) to set its window.")
            return
        low, high = (float(v) for v in limits)
        for shown in same_ct_layers(self.viewer, layer):  # every grid tile showing this CT
            range_low, range_high = shown.contrast_limits_range
            if low < range_low or high > range_high:  # let the slider reach the window too
                shown.contrast_limits_range = (min(low, range_low), max(high, range_high))
            shown.contrast_limits = (low, high)
        self._show_limits()

    # --- internals ----------------------------------------------------------------------------
    def _set_domain(self, domain: str) -> None:
        """Preset buttons, units and note of ``domain`` (rebuilt only when it changes)."""
        if domain == self.domain:
            return
        self.domain = domain
        for button in self.buttons.values():
            self.button_group.removeButton(button)
            self.button_grid.removeWidget(button)
            button.deleteLater()
        self.buttons = {}
        unit = UNITS[domain].strip() or "grey values"
        for i, (name, preset) in enumerate(presets_for(domain).items()):
            button = QPushButton(name.capitalize())
            button.setCheckable(True)
            button.setToolTip(f"W {preset.width:g} / L {preset.level:g} {unit}")
            button.clicked.connect(lambda _checked=False, n=name: self.apply_preset(n))
            self.button_group.addButton(button)
            self.buttons[name] = button
            self.button_grid.addWidget(button, i // 2, i % 2)
        for box in (self.width_box, self.level_box):
            box.setSuffix(UNITS[domain])
        self.domain_note.setText("8-bit display image, not HU: presets stretch its published grey values."
                                 if domain == DISPLAY8 else "")
        self.domain_note.setVisible(domain == DISPLAY8)

    def _follow_active_layer(self, event=None):
        """Selecting an image in napari's layer list makes it the widget's layer too."""
        active = self.viewer.layers.selection.active
        if active is not None and active in image_layers(self.viewer):
            try:
                self.layer_combo.set_layer(active)
            except RuntimeError:  # the widget was closed; its Qt objects are gone
                pass

    def _watch_layer(self, *_):
        if self._watched is not None:
            try:
                self._watched.events.contrast_limits.disconnect(self._show_limits)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched = self.current_layer()
        if self._watched is not None:
            self._watched.events.contrast_limits.connect(self._show_limits)
        self._show_limits()

    def _show_limits(self, *_):
        layer = self.current_layer()
        enabled = layer is not None
        for widget in (self.width_box, self.level_box, *self.buttons.values()):
            widget.setEnabled(enabled)
        if layer is None:
            self.readout.setText("No image layer: open a CT to set its window.")
            return
        self._set_domain(layer_domain(layer))
        width, level = width_level(layer.contrast_limits)
        for box, value in ((self.width_box, width), (self.level_box, level)):
            box.blockSignals(True)
            box.setValue(value)
            box.blockSignals(False)
        preset = matching_preset(layer.contrast_limits, domain=self.domain)
        self.button_group.setExclusive(False)
        for name, button in self.buttons.items():
            button.setChecked(name == preset)
        self.button_group.setExclusive(True)
        unit = UNITS[self.domain].strip() or "(grey values)"
        self.readout.setText(f"W {width:g} / L {level:g} {unit}" + (f"  ({preset} window)" if preset else ""))

    def _apply_boxes(self, *_):
        self.set_width_level(self.width_box.value(), self.level_box.value())
