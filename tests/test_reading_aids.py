"""On the canvas: R/L/A/P letters per view, slice index and position in mm, the value under the
cursor (HU or 8-bit), one-click coronal and sagittal views; case + class layer names and fixed
colours for masks opened from files."""

import os

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_covidseg.intensity import DOMAIN_KEY
from napari_covidseg.io.nifti import save_volume
from napari_covidseg.widgets.layer_style import REFERENCE_COLORS, case_layer_name
from napari_covidseg.widgets.reading_aids import camera, markers_of, reading_aids
from napari_covidseg.widgets.view_panel import ViewPanel

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


def _panel(make_napari_viewer, qtbot, show=False):
    viewer = make_napari_viewer(show=show)
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    panel = ViewPanel(viewer)
    viewer.window.add_dock_widget(panel)
    return viewer, panel


def test_letters_slice_position_and_views(make_napari_viewer, qtbot):
    viewer, panel = _panel(make_napari_viewer, qtbot, show=True)
    ct = viewer.layers["phantom CT"]
    aids = reading_aids(viewer)
    assert markers_of(viewer) == ("A", "P", "R", "L")
    z = 7
    viewer.dims.set_point(0, z * ct.scale[0])
    # the phantom's geometry puts slice 0 at S 0 mm, 10 mm apart
    assert aids.overlay("covidseg_slice").text == f"Axial {z} [0-{ct.data.shape[0] - 1}] · S {z * ct.scale[0]:.1f} mm"

    qtbot.mouseClick(panel.view_buttons["coronal"], Qt.LeftButton)
    assert tuple(viewer.dims.order) == (1, 0, 2) and tuple(viewer.dims.displayed) == (0, 2)
    assert [str(v) for v in camera(viewer).orientation2d] == ["up", "right"]  # head at the top
    assert markers_of(viewer) == ("S", "I", "R", "L")
    assert aids.overlay("covidseg_slice").text.startswith("Coronal ")
    assert " mm" in aids.overlay("covidseg_slice").text and (" A " in aids.overlay("covidseg_slice").text
                                                             or " P " in aids.overlay("covidseg_slice").text)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(50)
    viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "view_coronal.png"))

    qtbot.mouseClick(panel.view_buttons["sagittal"], Qt.LeftButton)
    assert tuple(viewer.dims.displayed) == (0, 1) and markers_of(viewer) == ("S", "I", "A", "P")
    qtbot.mouseClick(panel.view_buttons["axial"], Qt.LeftButton)
    assert tuple(viewer.dims.order) == (0, 1, 2) and markers_of(viewer) == ("A", "P", "R", "L")
    assert [str(v) for v in camera(viewer).orientation2d] == ["down", "right"]

    panel.aids_check.setChecked(False)
    assert markers_of(viewer) == ("", "", "", "") and not aids.overlay("covidseg_slice").visible
    panel.aids_check.setChecked(True)
    assert markers_of(viewer) == ("A", "P", "R", "L")

    # grid mode (side by side): no letters on the tiles' titles, the slice line out of the first one's
    viewer.canvas.grid.enabled = True
    assert markers_of(viewer) == ("", "", "", "")
    assert aids.overlay("covidseg_slice").visible and str(aids.overlay("covidseg_slice").position) == "bottom_right"
    viewer.canvas.grid.enabled = False
    assert markers_of(viewer) == ("A", "P", "R", "L") and str(aids.overlay("covidseg_slice").position) == "top_left"


def test_value_under_the_cursor(make_napari_viewer, qtbot):
    viewer, panel = _panel(make_napari_viewer, qtbot)
    ct = viewer.layers["phantom CT"]
    aids = reading_aids(viewer)
    z, y, x = 12, 64, 40
    viewer.cursor.position = tuple(np.array([z, y, x]) * np.asarray(ct.scale))
    aids._mouse_moved(viewer, None)
    overlay = aids.overlay("covidseg_cursor")
    assert overlay.visible and overlay.text == f"{float(ct.data[z, y, x]):.0f} HU at x {x}, y {y}, z {z}"
    viewer.cursor.position = (z * ct.scale[0], -50.0, -50.0)  # off the image: nothing
    aids._mouse_moved(viewer, None)
    assert not overlay.visible
    # an 8-bit display image says so, and never "HU"
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    eight = viewer.add_image(np.full((3, 8, 8), 77, np.uint8), metadata={DOMAIN_KEY: "display8", "covidseg_geometry": None})
    assert aids.cursor_text((1.0, 2.0, 3.0)) == "77 (8-bit value) at x 3, y 2, z 1"
    del eight


def test_case_and_class_names_and_fixed_colours_for_files(make_napari_viewer, tiny_phantom, tmp_path):
    for folder, data in (("images", tiny_phantom.ct), ("lung", tiny_phantom.lung), ("infection", tiny_phantom.infection)):
        (tmp_path / folder).mkdir()
        save_volume(tmp_path / folder / "cc01.nii.gz", data, tiny_phantom.geometry)
    two_lungs = tiny_phantom.lung.astype(np.uint8)
    two_lungs[..., two_lungs.shape[2] // 2:] *= 2  # 1 = right, 2 = left lung: one colour
    save_volume(tmp_path / "lung" / "cc02.nii.gz", two_lungs, tiny_phantom.geometry)
    viewer = make_napari_viewer()
    for path in ("images/cc01.nii.gz", "lung/cc01.nii.gz", "infection/cc01.nii.gz", "lung/cc02.nii.gz"):
        viewer.open(str(tmp_path / path), plugin="napari-covidseg")
    assert [layer.name for layer in viewer.layers] == ["cc01", "cc01 lung", "cc01 infection", "cc02 lung"]
    for name, cls in (("cc01 lung", "lung"), ("cc01 infection", "infection")):
        rgba = viewer.layers[name].colormap.map(np.array([0, 1]))
        assert rgba[0][3] == 0
        np.testing.assert_allclose(rgba[1], REFERENCE_COLORS[cls], atol=1e-6)
    both = viewer.layers["cc02 lung"].colormap.map(np.array([1, 2]))
    np.testing.assert_allclose(both[0], both[1])
    assert case_layer_name("case_lung", "/d/lung/case_lung.nii.gz", True) == "case_lung"
    assert case_layer_name("ct", "/d/whatever/ct.nii.gz", True) == "ct"
    assert case_layer_name("coronacases_001", "/d/Infection_Mask/coronacases_001.nii", True) == "coronacases_001 infection"


def test_open_buttons_read_through_the_plugin_and_views_need_a_volume(make_napari_viewer, qtbot, tiny_phantom,
                                                                     tmp_path, monkeypatch):
    from napari_covidseg.widgets import view_panel

    errors = []
    monkeypatch.setattr(view_panel, "notify_error", lambda e: errors.append(str(e)))
    viewer = make_napari_viewer()
    panel = ViewPanel(viewer)
    qtbot.addWidget(panel)
    qtbot.mouseClick(panel.view_buttons["coronal"], Qt.LeftButton)  # nothing open yet
    assert errors and "Open a CT" in errors[-1] and panel.view_buttons["axial"].isChecked()
    save_volume(tmp_path / "chest.nii.gz", tiny_phantom.ct, tiny_phantom.geometry)
    monkeypatch.setattr(view_panel.QFileDialog, "getOpenFileName", lambda *a, **k: (str(tmp_path / "chest.nii.gz"), ""))
    qtbot.mouseClick(panel.open_file_button, Qt.LeftButton)
    ct = viewer.layers["chest"]
    assert "covidseg_geometry" in ct.metadata and tuple(ct.contrast_limits) == (-1350.0, 150.0)  # the plugin's reader
    qtbot.mouseClick(panel.sample_button, Qt.LeftButton)
    assert "phantom CT" in viewer.layers
