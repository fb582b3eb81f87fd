"""CT window presets: the numbers, and the dock widget switching a CT layer's window by clicks."""

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_covidseg.io.geometry import GEOMETRY_KEY, Geometry
from napari_covidseg.windowing import WINDOW_PRESETS, contrast_limits, matching_preset, width_level
from napari_covidseg.widgets.window_widget import WindowWidget


def test_preset_numbers():
    assert contrast_limits("lung") == (-1350.0, 150.0)
    assert contrast_limits("mediastinum") == (-160.0, 240.0)
    assert contrast_limits("bone") == (-500.0, 1300.0)
    assert contrast_limits("Soft_Tissue") == (-125.0, 225.0)
    assert width_level((-1350, 150)) == (1500.0, -600.0)
    assert matching_preset((-160, 240)) == "mediastinum" and matching_preset((0, 1)) is None
    with pytest.raises(KeyError, match="choose one of"):
        contrast_limits("brain")


def _ct_layer(viewer, name="chest"):
    data = np.random.default_rng(0).integers(-1000, 400, size=(4, 16, 16)).astype(np.int16)
    geometry = Geometry.from_display_spacing(data.shape, (2.5, 0.7, 0.7))
    return viewer.add_image(data, name=name, scale=(2.5, 0.7, 0.7), contrast_limits=contrast_limits("lung"),
                            metadata={GEOMETRY_KEY: geometry})


def test_buttons_switch_the_window_and_readout_follows(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 16, 16), np.float32), name="not a CT")
    ct = _ct_layer(viewer)
    widget = WindowWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.current_layer() is ct  # the layer with CT geometry is preferred
    assert widget.buttons["lung"].isChecked() and "lung" in widget.readout.text()

    for name in ("mediastinum", "bone", "soft tissue", "lung"):
        qtbot.mouseClick(widget.buttons[name], Qt.LeftButton)
        assert tuple(ct.contrast_limits) == WINDOW_PRESETS[name].contrast_limits
        assert widget.buttons[name].isChecked()
        preset = WINDOW_PRESETS[name]
        assert f"W {preset.width:g} / L {preset.level:g}" in widget.readout.text()

    # bone window reaches beyond the data's range: napari's slider range grows to hold it
    qtbot.mouseClick(widget.buttons["bone"], Qt.LeftButton)
    assert ct.contrast_limits_range[1] >= 1300

    # napari's own slider changes the window: widget shows the new W/L, no preset checked
    ct.contrast_limits = (-1000, 0)
    assert widget.width_box.value() == 1000 and widget.level_box.value() == -500
    assert not any(button.isChecked() for button in widget.buttons.values())

    # typing W/L sets the window
    widget.width_box.setValue(400)
    widget.level_box.setValue(40)
    assert tuple(ct.contrast_limits) == contrast_limits("mediastinum")
    assert widget.buttons["mediastinum"].isChecked()


def test_without_image_layers_the_widget_is_disabled(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = WindowWidget(viewer)
    qtbot.addWidget(widget)
    assert not widget.buttons["lung"].isEnabled()
    widget.apply_preset("lung")  # no layer: a hint, no exception
    assert "open a ct" in widget.readout.text().lower()
    ct = _ct_layer(viewer)
    assert widget.current_layer() is ct and widget.buttons["bone"].isEnabled()
    qtbot.mouseClick(widget.buttons["bone"], Qt.LeftButton)
    assert tuple(ct.contrast_limits) == contrast_limits("bone")


def test_widget_follows_the_layer_selected_in_napari(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    first = _ct_layer(viewer, "first")
    second = _ct_layer(viewer, "second")
    widget = WindowWidget(viewer)
    qtbot.addWidget(widget)
    viewer.layers.selection.active = first
    assert widget.current_layer() is first
    viewer.layers.selection.active = second
    assert widget.current_layer() is second
    qtbot.mouseClick(widget.buttons["bone"], Qt.LeftButton)
    assert tuple(second.contrast_limits) == contrast_limits("bone")
    assert tuple(first.contrast_limits) == contrast_limits("lung")  # the other CT is left alone


def test_8bit_image_gets_display_presets_and_grey_value_units(make_napari_viewer, qtbot):
    from napari_covidseg.intensity import DOMAIN_KEY
    from napari_covidseg.widgets.window_widget import WindowWidget

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).integers(0, 256, (4, 32, 32)).astype(np.uint8)
    viewer.add_image(data, name="png stack [8-bit, not HU]", metadata={DOMAIN_KEY: "display8"}, contrast_limits=(0, 255))
    widget = WindowWidget(viewer)
    qtbot.addWidget(widget)
    assert set(widget.buttons) == {"as published", "more contrast", "brighter", "darker"}
    assert widget.width_box.suffix() == "" and "8-bit" in widget.domain_note.text()
    assert widget.buttons["as published"].isChecked()
    widget.buttons["brighter"].click()
    assert tuple(viewer.layers[0].contrast_limits) == (0.0, 180.0)
    viewer.add_image(np.full((4, 32, 32), -1000, np.int16) + np.arange(32, dtype=np.int16), name="ct")
    widget.layer_combo.set_layer(viewer.layers["ct"])
    assert "lung" in widget.buttons and widget.width_box.suffix() == " HU"
