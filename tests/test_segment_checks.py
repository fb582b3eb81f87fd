"""Segment: model card, plausibility checks with a visible warning, optional clean-up, a CT closed
mid-run, and undo leaving a mask unedited; driven through the widget."""

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_covidseg import inference, weights_catalog
from napari_covidseg.inference import SegmentationResult
from napari_covidseg.io.geometry import GEOMETRY_KEY
from napari_covidseg.widgets import common, segment_widget
from napari_covidseg.widgets.edits import is_edited
from napari_covidseg.widgets.result_checks import PostProcessing, body_mask, check_result, postprocess
from napari_covidseg.widgets.segment_widget import SegmentWidget


@pytest.fixture
def shown(monkeypatch):
    messages = []
    monkeypatch.setattr(segment_widget, "notify_warning", lambda m: messages.append("warning: " + str(m)))
    monkeypatch.setattr(segment_widget, "notify_error", lambda m: messages.append("error: " + common.error_text(m)))
    monkeypatch.setattr(segment_widget, "notify_info", lambda m: messages.append("info: " + str(m)))
    return messages


def _setup(make_napari_viewer, phantom, checkpoint):
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom.ct, name="CT", scale=phantom.spacing, metadata={GEOMETRY_KEY: phantom.geometry})
    widget = SegmentWidget(viewer)
    widget.set_network("unet")
    widget.weights.use_file(checkpoint)
    widget.set_device("cpu")
    return viewer, ct, widget


def _fake_network(monkeypatch, lung, infection):
    def fake(loaded, ct, spacing, **kwargs):
        return SegmentationResult(lung.astype(np.uint8).copy(), infection.astype(np.uint8).copy(),
                                  np.zeros((2,) + ct.shape, np.float32))

    monkeypatch.setattr(inference, "segment_volume", fake)


def _run(qtbot, widget):
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=60000)


def test_model_card_says_what_the_weights_know(make_napari_viewer, qtbot, isolated_catalog):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_network("unet")
    entry = widget.weights.current_entry()
    assert entry is not None and entry.shipped
    card = widget.card
    assert card.headline.text().startswith("Shipped weights: trained on")
    if weights_catalog.phantom_only(entry.info):
        assert not card.warning.isHidden() and "not validated on patient CT" in card.warning.text()
    assert "Dice" in card.summary.text()  # its best evidence, per class
    assert card.details.isHidden()
    qtbot.mouseClick(card.details_button, Qt.LeftButton)
    assert not card.details.isHidden() and "split by case" in card.details.text()


def test_real_data_checkpoint_card(tmp_path):
    info = {"network": "unet", "training": {
        "data": ["/d/covid19ctseg_dstaroff", "/d/infnet,labels=infection,weight=0.2", "phantom,weight=0.15"],
        "n_train": 53, "n_val": 9, "epochs_done": 4, "epochs_planned": 30, "wall_minutes": 25.9, "device": "cpu",
        "deviations_from_paper": {"crop_size": [192, 192]}},
        "metrics": {"val": {"lung": {"dice": 0.91}, "infection": {"dice": 0.02}}}}
    card = weights_catalog.model_card(info)
    assert card.headline == "Checkpoint: trained on covid19ctseg_dstaroff + infnet + phantom (53 train / 9 val cases)"
    assert card.warning is None  # real CT in the data
    assert card.figures == ["Validation: lung Dice 0.91 · infection Dice 0.02 (epoch 4)"]
    details = "\n".join(card.details)
    assert "epochs: 4 of 30" in details and "training: 4 epochs in 25.9 min on cpu" in details and "crop_size=[192, 192]" in details
    phantom = weights_catalog.model_card({"training": {"data": "phantom: 17 cases, seeds 100..116"}})
    assert phantom.warning.startswith("Synthetic phantoms only")


def test_checks_and_cleanup_functions(tiny_phantom):
    body = body_mask(tiny_phantom.ct)
    lung, inf = tiny_phantom.lung != 0, tiny_phantom.infection != 0
    assert (lung & ~body).sum() <= 0.01 * lung.sum()  # the body holds the lungs
    assert not body[:, 0, 0].any()  # and not the air in the corner
    assert [f.level for f in check_result(lung, inf, body, tiny_phantom.spacing)] == []
    stray = lung.copy()
    stray[:, :3, :] = True  # "lung" in the air in front of the patient
    texts = [f.text for f in check_result(stray, inf, body, tiny_phantom.spacing)]
    assert any("outside the body" in t for t in texts)
    flood = check_result(lung, lung | inf, body, tiny_phantom.spacing)
    assert any("Infection covers" in f.text for f in flood)
    empty = check_result(np.zeros_like(lung), np.zeros_like(inf), body, tiny_phantom.spacing)
    assert [f.level for f in empty] == ["warning", "note"]
    speck = inf.copy()
    speck[0, 0, 0] = True
    cleaned_lung, cleaned_inf = postprocess(stray, speck, body, PostProcessing(True, True, 0.5), tiny_phantom.spacing)
    assert not cleaned_lung[:, :3, :].any() and cleaned_lung.sum() >= 0.95 * lung.sum()
    assert cleaned_inf[0, 0, 0] == 0


def test_implausible_result_is_flagged_and_cleanup_applies(make_napari_viewer, qtbot, tiny_phantom,
                                                           tiny_unet_checkpoints, isolated_catalog, shown, monkeypatch):
    viewer, ct, widget = _setup(make_napari_viewer, tiny_phantom, tiny_unet_checkpoints["trained"])
    stray = tiny_phantom.lung != 0
    stray[:, :4, :] = True  # lung in the air in front of the chest
    _fake_network(monkeypatch, stray, stray)  # and "infection" everywhere the lung is
    _run(qtbot, widget)
    assert not widget.findings_label.isHidden()
    assert "outside the body" in widget.findings_label.text() and "Infection covers" in widget.findings_label.text()
    assert any(m.startswith("warning: Check this result") for m in shown)
    import os

    screenshots = os.path.join(os.path.dirname(__file__), "..", "screenshots")
    os.makedirs(screenshots, exist_ok=True)
    viewer.window.add_dock_widget(widget, name="Segment")
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(50)
    viewer.window._qt_window.grab().save(os.path.join(screenshots, "segment_findings.png"))
    # the clean-up removes the stray lung and the warning about it goes away
    widget.body_check.setChecked(True)
    widget.components_check.setChecked(True)
    _run(qtbot, widget)
    lung = viewer.layers["unet lung"].data
    assert not lung[:, :4, :].any()
    assert "outside the body" not in widget.findings_label.text()
    assert "Clean-up: lung kept inside the body" in widget.runner.status_label.text()


def test_ct_closed_while_segmenting_drops_the_result(make_napari_viewer, qtbot, tiny_phantom, tiny_unet_checkpoints,
                                                     isolated_catalog, shown, monkeypatch):
    import time

    viewer, ct, widget = _setup(make_napari_viewer, tiny_phantom, tiny_unet_checkpoints["random"])
    real = inference.run_prediction
    started = []

    def slow(*args, progress=None, **kwargs):
        def tick(done, total):
            started.append(done)
            time.sleep(0.1)
            progress(done, total)

        return real(*args, progress=tick, batch_size=1, **kwargs)

    monkeypatch.setattr(inference, "run_prediction", slow)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: len(started) >= 2, timeout=20000)
    viewer.layers.remove(ct)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=30000)
    assert [layer.name for layer in viewer.layers] == []
    assert "closed" in widget.runner.status_label.text()


def test_undo_leaves_a_mask_unedited(make_napari_viewer, qtbot, tiny_phantom, tiny_unet_checkpoints,
                                     isolated_catalog, shown, monkeypatch):
    viewer, ct, widget = _setup(make_napari_viewer, tiny_phantom, tiny_unet_checkpoints["trained"])
    _fake_network(monkeypatch, tiny_phantom.lung != 0, tiny_phantom.infection != 0)
    _run(qtbot, widget)
    lung = viewer.layers["unet lung"]
    lung.paint((5, 20, 20), 1)  # a brush dab, as napari's paint tool makes it
    lung.paint((5, 2, 2), 1)
    assert is_edited(lung)
    lung.undo()
    lung.undo()
    assert not is_edited(lung)
    _run(qtbot, widget)  # the re-run may replace it: no "unet lung (2)"
    assert "unet lung (2)" not in viewer.layers
    lung.paint((5, 2, 2), 1)
    _run(qtbot, widget)
    assert "unet lung (2)" in viewer.layers
