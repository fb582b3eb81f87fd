"""Quantify widget on the small phantom: numbers equal quantify(), patient sides, edits, exports."""

import csv
import json
import os

import numpy as np
import pytest

from napari_covidseg.quantify import quantify

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


@pytest.fixture
def phantom_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    return viewer


def _widget(viewer, qtbot, infection_layer=None):
    from napari_covidseg.widgets.quantify_widget import QuantifyWidget

    widget = QuantifyWidget(viewer)
    qtbot.addWidget(widget)
    widget.lung_combo.set_layer(viewer.layers["phantom lung GT"])
    widget.infection_combo.set_layer(infection_layer or viewer.layers["phantom infection GT"])
    widget.ct_combo.set_layer(viewer.layers["phantom CT"])
    return widget


def test_compute_equals_quantify_exports_and_screenshot(phantom_viewer, qtbot, tmp_path):
    viewer = phantom_viewer
    widget = _widget(viewer, qtbot)
    viewer.window.add_dock_widget(widget, name="Quantify")
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    lung, inf, ct = (viewer.layers[n] for n in ("phantom lung GT", "phantom infection GT", "phantom CT"))
    expected = quantify(np.asarray(lung.data), np.asarray(inf.data), tuple(ct.scale), ct_hu=np.asarray(ct.data))
    assert widget.result.keys() == expected.keys()
    for key in ("lung_ml", "infection_ml", "total_involvement_pct", "left_involvement_pct", "right_involvement_pct"):
        assert widget.result[key] == pytest.approx(expected[key])
    assert widget.result["n_lesions"] == expected["n_lesions"] > 0
    assert widget.value_text("Infection volume") == f"{expected['infection_ml']:.1f} mL"
    assert widget.value_text("Lung volume") == f"{expected['lung_ml']:.1f} mL"
    assert widget.value_text("Total involvement") == f"{expected['total_involvement_pct']:.1f} %"
    assert widget.value_text("Lesions") == str(int(expected["n_lesions"]))
    assert widget.value_text("Severity (MosMedData)") == expected["severity_grade"]
    assert widget.severity_label.text().startswith(expected["severity_grade"] + ": ")
    assert widget.value_text("Ground glass (< -300 HU)") == f"{expected['ground_glass_ml']:.1f} mL"
    assert expected["ground_glass_ml"] > 0 and expected["consolidation_ml"] > 0  # the phantom has both
    csv_path = widget.export(tmp_path / "q.csv", "csv")
    rows = {r[0]: r[1] for r in list(csv.reader(open(csv_path)))[1:]}
    assert float(rows["infection_ml"]) == pytest.approx(widget.result["infection_ml"], rel=1e-5)
    assert int(rows["n_lesions"]) == widget.result["n_lesions"]
    json_path = widget.export(tmp_path / "q.json", "json")
    data = json.load(open(json_path))
    assert data["layers"] == {"lung": "phantom lung GT", "infection": "phantom infection GT"}
    assert data["result"]["lung_ml"] == pytest.approx(widget.result["lung_ml"])
    with pytest.raises(Exception, match="exists"):
        widget.export(json_path, "json")
    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(200)
    assert viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "quantify_widget.png"))


def test_left_right_by_patient_side(phantom_viewer, qtbot):
    viewer = phantom_viewer
    lung = np.asarray(viewer.layers["phantom lung GT"].data) != 0
    # Display columns grow toward the patient's left: keep only lung voxels right of the midline.
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    mid = (cols.min() + cols.max()) // 2
    only_left = np.zeros(lung.shape, np.uint8)
    only_left[..., mid + 3 :] = lung[..., mid + 3 :]
    only_left[: lung.shape[0] // 2] = 0  # a partial involvement
    layer = viewer.add_labels(only_left, name="left infection", scale=viewer.layers["phantom CT"].scale)
    widget = _widget(viewer, qtbot, infection_layer=layer)
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    assert widget.result["left_involvement_pct"] > 1.0
    assert widget.result["right_involvement_pct"] == 0.0
    assert widget.value_text("Right lung involved") == "0.0 %"
    assert float(widget.value_text("Left lung involved").split()[0]) > 1.0


def test_auto_update_after_edit(phantom_viewer, qtbot):
    viewer = phantom_viewer
    widget = _widget(viewer, qtbot)
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    before = widget.result["infection_ml"]
    inf = viewer.layers["phantom infection GT"]
    lung = np.asarray(viewer.layers["phantom lung GT"].data) != 0
    z = inf.data.shape[0] // 2
    inf.data[z][lung[z]] = 1  # the whole lung slice becomes infection
    inf.refresh()
    inf.events.paint(value=[])
    assert widget.busy()  # the edit is waiting for the debounce timer
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    assert widget.result["infection_ml"] > before
    expected = quantify(np.asarray(viewer.layers["phantom lung GT"].data), np.asarray(inf.data), tuple(inf.scale))
    assert widget.result["infection_ml"] == pytest.approx(expected["infection_ml"])
    assert widget.value_text("Infection volume") == f"{expected['infection_ml']:.1f} mL"


def test_cancel_drops_the_result_and_errors_notify(phantom_viewer, qtbot, monkeypatch):
    from napari_covidseg.widgets import quantify_widget

    viewer = phantom_viewer
    messages = []
    monkeypatch.setattr(quantify_widget, "notify_error", lambda e: messages.append(str(e)))
    real = quantify_widget.quantify
    monkeypatch.setattr(quantify_widget, "quantify", lambda *a, **k: (__import__("time").sleep(0.3), real(*a, **k))[1])
    widget = _widget(viewer, qtbot)
    widget.compute_button.click()
    assert widget.busy() and not widget.runner.isHidden()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    assert widget.result is None and widget.status.text() == "Cancelled."
    small = viewer.add_labels(np.zeros((2, 3, 4), np.uint8), name="small")
    widget.infection_combo.set_layer(small)
    widget.compute_button.click()
    assert messages and "shape" in messages[-1]


def test_placeholder_spacing_gives_voxels_and_says_why(phantom_viewer, qtbot):
    from napari_covidseg.io.geometry import SPACING_KNOWN_KEY

    viewer = phantom_viewer
    viewer.layers["phantom CT"].metadata[SPACING_KNOWN_KEY] = False
    widget = _widget(viewer, qtbot)
    # the smallest lesion is set in voxels too (the default 0.1 mL is 100 voxels of 1 mm)
    assert widget.min_lesion_spin.suffix() == " voxels" and widget.min_lesion_spin.value() == 100
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    lung = int(np.count_nonzero(viewer.layers["phantom lung GT"].data))
    assert widget.value_text("Lung volume") == f"{lung} voxels"
    assert "mL" not in widget.value_text("Infection volume")
    assert "voxel size unknown" in widget.status.text()
    assert widget.result["min_lesion_voxels"] == 100
    infection = viewer.layers["phantom infection GT"].data
    widget.min_lesion_spin.setValue(int(np.count_nonzero(infection)) + 1)  # larger than all the infection
    qtbot.waitUntil(lambda: not widget.busy() and widget.result["n_lesions"] == 0, timeout=10000)
    widget.ct_combo.set_layer(None)  # the masks' own scale is real: back to mL, the same size
    assert widget.min_lesion_spin.suffix() == " mL"
    assert widget.min_lesion_ml() == pytest.approx((np.count_nonzero(infection) + 1) / 1000.0, abs=0.005)


def test_smallest_lesion_and_grade_follow_the_setting(phantom_viewer, qtbot):
    viewer = phantom_viewer
    widget = _widget(viewer, qtbot)
    assert widget.min_lesion_spin.value() == pytest.approx(0.1)  # the default where the spacing is real
    speckled = np.array(viewer.layers["phantom infection GT"].data, copy=True)
    speckled[0, 5, 5] = speckled[0, 9, 9] = 1  # two one-voxel specks (0.08 mL each)
    specks = viewer.add_labels(speckled, name="speckled infection", scale=viewer.layers["phantom CT"].scale)
    widget.infection_combo.set_layer(specks)
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    true_lesions = widget.result["n_lesions"]
    widget.min_lesion_spin.setValue(0.0)  # every speck counts: the table follows at once
    qtbot.waitUntil(lambda: not widget.busy() and widget.result["n_lesions"] == true_lesions + 2, timeout=10000)
    widget.min_lesion_spin.setValue(60.0)  # only the largest lesion of the phantom is bigger
    qtbot.waitUntil(lambda: not widget.busy() and widget.result["n_lesions"] == 1, timeout=10000)
    assert widget.value_text("Lesions") == "1" and widget.result["lesion_volumes_ml"][0] > 60
