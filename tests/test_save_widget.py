"""Correct-and-save widget: save with the CT's geometry, never clobber, training folder, revert."""

import os

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg.io.geometry import GEOMETRY_KEY, Geometry
from napari_covidseg.io.nifti import load_volume

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


def _oblique_ct(path):
    """A small CT whose file axes are permuted and flipped relative to the display, with an offset."""
    rng = np.random.default_rng(1)
    file_array = rng.integers(-1000, 300, size=(14, 9, 11)).astype(np.int16)
    affine = np.array(
        [
            [0.0, 0.9, 0.0, -60.0],  # file axis 1 -> +R (display x is flipped)
            [-0.8, 0.0, 0.0, 40.0],  # file axis 0 -> -A
            [0.0, 0.0, 2.5, -120.0],  # file axis 2 -> +S
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(file_array, affine), str(path))
    return affine


@pytest.fixture
def ct_viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    ct_path = tmp_path / "patient.nii.gz"
    affine = _oblique_ct(ct_path)
    layers = viewer.open(str(ct_path), plugin="napari-covidseg")
    ct = layers[0]
    assert isinstance(ct.metadata.get(GEOMETRY_KEY), Geometry)
    mask = np.zeros(ct.data.shape, np.uint8)
    mask[3:6, 2:5, 1:7] = 1
    labels = viewer.add_labels(mask, name="prediction", scale=ct.scale, translate=ct.translate)
    labels.metadata[GEOMETRY_KEY] = ct.metadata[GEOMETRY_KEY]
    return viewer, ct, labels, ct_path, affine


def _widget(viewer, qtbot, ct, labels):
    from napari_covidseg.widgets.save_widget import SaveWidget

    widget = SaveWidget(viewer)
    qtbot.addWidget(widget)
    widget.mask_combo.set_layer(labels)
    widget.ct_combo.set_layer(ct)
    return widget


def test_save_writes_edited_mask_with_ct_affine(ct_viewer, qtbot, tmp_path):
    viewer, ct, labels, ct_path, affine = ct_viewer
    widget = _widget(viewer, qtbot, ct, labels)
    labels.data[4, 5:7, 2:4] = 1  # a brush edit
    labels.data[3, 2, 1] = 0  # an eraser edit
    labels.refresh()
    out = tmp_path / "corrected.nii.gz"
    assert widget.save_to(out) is not None
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    saved = load_volume(out)
    np.testing.assert_array_equal(saved.data, labels.data)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine)
    assert img.shape == nib.load(str(ct_path)).shape
    assert str(out) in widget.status.text()

    # "Revert edits" puts back the mask as it was when it appeared in the viewer.
    widget.revert_button.click()
    assert labels.data[4, 5:7, 2:4].sum() == 0 and labels.data[3, 2, 1] == 1
    assert int(labels.data.sum()) == 3 * 3 * 6
    # A new prediction replacing the whole array becomes the state "Revert" returns to.
    rerun = np.zeros_like(labels.data)
    rerun[1, 1, 1] = 1
    labels.data = rerun.copy()
    labels.data[2, 2, 2] = 1  # then a brush edit
    labels.refresh()
    widget.revert_button.click()
    np.testing.assert_array_equal(labels.data, rerun)


def test_never_overwrites_the_source_ct(ct_viewer, qtbot, monkeypatch):
    from napari_covidseg.widgets import save_widget

    viewer, ct, labels, ct_path, affine = ct_viewer
    widget = _widget(viewer, qtbot, ct, labels)
    asked = []
    monkeypatch.setattr(save_widget, "ask_overwrite", lambda *a: asked.append(a) or True)
    monkeypatch.setattr(save_widget, "notify_error", lambda e: None)
    before = ct_path.read_bytes()
    assert widget.save_to(ct_path) is None
    assert ct_path.read_bytes() == before
    assert "never overwritten" in widget.status.text()
    assert not asked  # not even offered
    with pytest.raises(Exception, match="never overwritten"):
        widget.save_mask(ct_path, overwrite=True)
    assert ct_path.read_bytes() == before


def test_existing_target_asks_first(ct_viewer, qtbot, monkeypatch, tmp_path):
    from napari_covidseg.widgets import save_widget

    viewer, ct, labels, ct_path, affine = ct_viewer
    widget = _widget(viewer, qtbot, ct, labels)
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"precious")
    monkeypatch.setattr(save_widget, "ask_overwrite", lambda *a: False)
    assert widget.save_to(out) is None
    assert out.read_bytes() == b"precious"
    assert "mask_2.nii.gz" in widget.status.text()  # a free name is suggested
    monkeypatch.setattr(save_widget, "ask_overwrite", lambda *a: True)
    assert widget.save_to(out) is not None
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    np.testing.assert_array_equal(load_volume(out).data, labels.data)


def test_add_to_training_folder(ct_viewer, qtbot, tmp_path, monkeypatch):
    from napari_covidseg.widgets import save_widget

    monkeypatch.setattr(save_widget, "notify_error", lambda e: None)
    viewer, ct, labels, ct_path, affine = ct_viewer
    infection = np.zeros(ct.data.shape, np.uint8)
    infection[4, 3, 2:4] = 1
    inf_layer = viewer.add_labels(infection, name="infection", scale=ct.scale)
    widget = _widget(viewer, qtbot, ct, labels)
    folder = tmp_path / "train"
    widget.folder_edit.setText(str(folder))
    assert widget.case_edit.text() == "patient"  # defaults to the CT name
    widget.lung_combo.set_layer(labels)
    widget.infection_combo.set_layer(inf_layer)
    widget.add_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    for sub in ("images", "lung", "infection"):
        assert (folder / sub / "patient.nii.gz").exists()
    assert "now holds 1 case" in widget.status.text()
    np.testing.assert_array_equal(load_volume(folder / "images" / "patient.nii.gz").data, ct.data)
    np.testing.assert_allclose(nib.load(str(folder / "lung" / "patient.nii.gz")).affine, affine)
    first = (folder / "lung" / "patient.nii.gz").read_bytes()

    labels.data[:] = 0
    labels.refresh()
    widget.case_edit.setText("patient")
    widget.add_button.click()  # same id: refused, nothing clobbered, a free id proposed
    assert (folder / "lung" / "patient.nii.gz").read_bytes() == first
    assert widget.case_edit.text() == "patient_2"
    assert "already exists" in widget.status.text()
    widget.infection_combo.set_layer(None)
    widget.add_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    assert (folder / "lung" / "patient_2.nii.gz").exists()
    assert not (folder / "infection" / "patient_2.nii.gz").exists()
    assert "now holds 2 cases" in widget.status.text()


def test_screenshot(make_napari_viewer, qtbot, tmp_path):
    from napari_covidseg.widgets.save_widget import SaveWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    widget = SaveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct and save")
    widget.mask_combo.set_layer(viewer.layers["phantom infection GT"])
    widget.folder_edit.setText(str(tmp_path / "training"))
    widget.lung_combo.set_layer(viewer.layers["phantom lung GT"])
    widget.infection_combo.set_layer(viewer.layers["phantom infection GT"])
    widget.add_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(200)
    assert viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "save_widget.png"))
