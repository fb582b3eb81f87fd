"""Save defaults: the edited mask, <case>_<class>_corrected in the CT's format, a folder outside the
training folder's images/; refusing before any dialog; Add-to-training takes the corrected masks."""

import numpy as np
import pytest

from napari_covidseg.io.loader import load_any, save_any
from napari_covidseg.io.nifti import load_volume, save_volume
from napari_covidseg.widgets import save_widget
from napari_covidseg.widgets.edits import is_edited, watch_edits
from napari_covidseg.widgets.save_widget import SaveWidget


@pytest.fixture
def dialogs(monkeypatch):
    opened = []
    monkeypatch.setattr(save_widget.QFileDialog, "getSaveFileName", lambda *a, **k: opened.append(a) or ("", ""))
    monkeypatch.setattr(save_widget, "notify_error", lambda e: None)
    return opened


def _pairs_case(tmp_path, phantom):
    root = tmp_path / "pairs"
    for folder, data in (("images", phantom.ct), ("infection", phantom.infection)):
        (root / folder).mkdir(parents=True)
        save_volume(root / folder / "cc01.nii.gz", data, phantom.geometry)
    return root


def _prediction(viewer, ct, data, cls="infection"):
    layer = viewer.add_labels(data.astype(np.uint8), name=f"unet {cls}", scale=ct.scale,
                              metadata={"covidseg_source": {"network": "unet", "class": cls}})
    watch_edits(layer)
    return layer


def test_edited_mask_corrected_name_outside_images(make_napari_viewer, qtbot, tiny_phantom, tmp_path, dialogs):
    root = _pairs_case(tmp_path, tiny_phantom)
    viewer = make_napari_viewer()
    viewer.open(str(root / "images" / "cc01.nii.gz"), plugin="napari-covidseg")
    viewer.open(str(root / "infection" / "cc01.nii.gz"), plugin="napari-covidseg")
    ct, truth = viewer.layers["cc01"], viewer.layers["cc01 infection"]
    widget = SaveWidget(viewer)
    qtbot.addWidget(widget)
    prediction = _prediction(viewer, ct, tiny_phantom.infection)
    other = _prediction(viewer, ct, tiny_phantom.lung, "lung")
    prediction.paint((6, 20, 20), 1)  # the user corrects the infection
    assert is_edited(prediction) and not is_edited(other)
    assert widget.suggested_path() == root / "cc01_infection_corrected.nii.gz"  # not in images/
    assert widget.mask_combo.current_layer() is prediction
    qtbot.mouseClick(widget.save_button, 1)
    assert len(dialogs) == 1 and dialogs[0][2] == str(root / "cc01_infection_corrected.nii.gz")
    prediction.undo()  # undone: nothing is edited, the prediction of the network is still preferred over a file
    assert not is_edited(prediction)
    assert widget.mask_combo.current_layer() in (prediction, other)
    assert truth is not widget.mask_combo.current_layer()


def test_nothing_to_save_refuses_before_any_dialog(make_napari_viewer, qtbot, tiny_phantom, dialogs):
    viewer = make_napari_viewer()
    widget = SaveWidget(viewer)
    qtbot.addWidget(widget)
    widget.save_button.click()
    assert dialogs == [] and "no mask to save" in widget.status.text()
    viewer.add_labels(tiny_phantom.lung, name="lung")  # a mask, but no CT to take the geometry from
    widget.save_button.click()
    assert dialogs == [] and "Open the CT" in widget.status.text()


def test_saves_in_the_ct_format(make_napari_viewer, qtbot, tiny_phantom, tmp_path, dialogs):
    pytest.importorskip("SimpleITK")
    save_any(tmp_path / "scan.nrrd", tiny_phantom.ct, tiny_phantom.geometry)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "scan.nrrd"), plugin="napari-covidseg")
    ct = viewer.layers["scan"]
    prediction = _prediction(viewer, ct, tiny_phantom.infection)
    widget = SaveWidget(viewer)
    qtbot.addWidget(widget)
    suggested = widget.suggested_path()
    assert suggested == tmp_path / "scan_infection_corrected.nrrd"
    assert widget.save_to(suggested) is not None
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    saved = load_any(suggested, kind="labels")
    np.testing.assert_array_equal(saved.data, prediction.data)
    np.testing.assert_allclose(saved.geometry.affine, ct.metadata["covidseg_geometry"].affine, atol=1e-4)


def test_add_to_training_takes_the_corrected_masks(make_napari_viewer, qtbot, tiny_phantom, tmp_path, dialogs):
    root = _pairs_case(tmp_path, tiny_phantom)
    viewer = make_napari_viewer()
    viewer.open(str(root / "images" / "cc01.nii.gz"), plugin="napari-covidseg")
    viewer.open(str(root / "infection" / "cc01.nii.gz"), plugin="napari-covidseg")
    ct = viewer.layers["cc01"]
    widget = SaveWidget(viewer)
    qtbot.addWidget(widget)
    prediction = _prediction(viewer, ct, np.zeros_like(tiny_phantom.infection))
    prediction.paint((6, 20, 20), 1)
    widget.folder_edit.setText(str(tmp_path / "new_training"))
    widget.add_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=20000)
    written = load_volume(tmp_path / "new_training" / "infection" / "cc01.nii.gz").data
    np.testing.assert_array_equal(written, prediction.data)
