"""Segment dock widget driven through its buttons, with tiny checkpoints saved in tmp."""

import os
import time

import numpy as np
import pytest
from qtpy.QtCore import Qt, QTimer

from napari_covidseg.io.geometry import GEOMETRY_KEY
from napari_covidseg.metrics import dice
from napari_covidseg.widgets import common, segment_widget, weights_combo
from napari_covidseg.widgets.segment_widget import SegmentWidget

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


@pytest.fixture
def messages(monkeypatch):
    shown = []
    for module in (segment_widget, common, weights_combo):
        monkeypatch.setattr(module, "notify_error", lambda e, shown=shown: shown.append(common.error_text(e)))
    monkeypatch.setattr(segment_widget, "notify_warning", lambda e, shown=shown: shown.append("warning: " + str(e)))
    return shown


def _viewer_with_ct(make_napari_viewer, phantom):
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom.ct, name="phantom CT", scale=phantom.spacing, contrast_limits=(-1350, 150),
                          metadata={GEOMETRY_KEY: phantom.geometry})
    viewer.add_labels(phantom.lung, name="phantom lung GT", scale=phantom.spacing)
    return viewer, ct


def _widget(viewer, checkpoint_path):
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.set_network("unet")
    assert widget.weights.use_file(checkpoint_path) is not None
    assert widget.weights.current_path() == os.path.abspath(checkpoint_path)
    widget.set_device("cpu")
    return widget


def _assert_thresholded(mask, probability, threshold):
    """``mask`` is ``probability > threshold``: the maps are held as float16 and the masks come from
    the float32 values, so voxels within float16 rounding of the threshold may go either way."""
    decided = np.abs(probability.astype(np.float32) - threshold) > 2.0 ** -10
    np.testing.assert_array_equal(mask[decided], (probability > threshold).astype(np.uint8)[decided])


def _click_and_wait(qtbot, widget, timeout=30000):
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=timeout)


def test_run_adds_masks_on_the_ct_grid(make_napari_viewer, qtbot, tiny_unet_checkpoints, isolated_catalog, messages,
                                       monkeypatch):
    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-covidseg", "chest_phantom_small")  # the real plugin path (npe2 manifest)
    ct, lung_gt = viewer.layers["phantom CT"], viewer.layers["phantom lung GT"]
    widget = _widget(viewer, tiny_unet_checkpoints["trained"])
    assert widget.ct_combo.current_layer() is ct
    assert "data: phantom" in widget.weights_info.toolTip()
    widget.probability_check.setChecked(True)
    _click_and_wait(qtbot, widget)
    assert messages == []

    lung, infection = viewer.layers["unet lung"], viewer.layers["unet infection"]
    for layer in (lung, infection):
        assert layer.data.shape == ct.data.shape
        assert layer.data.dtype == np.uint8
        np.testing.assert_allclose(layer.scale, ct.scale)
        assert layer.metadata[GEOMETRY_KEY] is ct.metadata[GEOMETRY_KEY]
        assert 0.3 <= layer.opacity <= 0.7
    # fixed class colours: lung blue-ish, infection red/orange, background clear
    lung_rgba = lung.colormap.map(np.array([0, 1]))
    inf_rgba = infection.colormap.map(np.array([0, 1]))
    assert lung_rgba[0][3] == 0 and inf_rgba[0][3] == 0
    assert lung_rgba[1][2] > lung_rgba[1][0] and inf_rgba[1][0] > inf_rgba[1][2]
    # a briefly trained network finds the lungs
    assert dice(lung.data, lung_gt.data) > 0.6
    probability = viewer.layers["unet lung probability"]
    assert probability.data.shape == ct.data.shape and probability.blending == "additive"
    assert tuple(probability.contrast_limits) == (0.0, 1.0)
    assert probability.data.dtype == np.float16
    _assert_thresholded(lung.data, probability.data, 0.5)
    status = widget.runner.status_label.text()
    assert "CPU" in status and " s " in status and "mL" in status

    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.dims.set_point(0, ct.scale[0] * (ct.data.shape[0] // 2))
    viewer.layers["unet lung probability"].visible = False
    viewer.reset_view()
    qtbot.wait(50)
    viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "segment_widget.png"))

    # running again (another threshold) refreshes the same layers instead of stacking duplicates
    n_layers = len(viewer.layers)
    widget.threshold_spin.setValue(0.9)
    _click_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["unet lung"] is lung
    _assert_thresholded(lung.data, probability.data, 0.9)

    # a mask the user corrected is never overwritten by a re-run
    z = ct.data.shape[0] // 2
    lung.data_setitem((np.array([z]), np.array([0]), np.array([0])), 1)
    edited = lung.data.copy()
    monkeypatch.setattr(segment_widget, "notify_info", lambda m: messages.append("info: " + m))
    widget.threshold_spin.setValue(0.5)
    _click_and_wait(qtbot, widget)
    assert viewer.layers["unet lung"] is lung
    np.testing.assert_array_equal(lung.data, edited)
    assert "unet lung (2)" in viewer.layers and "unet infection (2)" not in viewer.layers
    _assert_thresholded(viewer.layers["unet lung (2)"].data, probability.data, 0.5)
    assert any("has your edits" in m for m in messages)


def test_gui_stays_responsive_and_cancel_stops(make_napari_viewer, qtbot, tiny_phantom, tiny_unet_checkpoints,
                                               isolated_catalog, messages, monkeypatch):
    viewer, ct = _viewer_with_ct(make_napari_viewer, tiny_phantom)
    widget = _widget(viewer, tiny_unet_checkpoints["random"])
    from napari_covidseg import inference

    real_predict = inference.run_prediction
    seen_progress = []

    def slow_predict(*args, progress=None, should_cancel=None, **kwargs):
        def slow_progress(done, total):
            seen_progress.append(done)
            progress(done, total)
            time.sleep(0.2)  # a slow network: ~12 slices x 0.2 s

        return real_predict(*args, progress=slow_progress, should_cancel=should_cancel, batch_size=1, **kwargs)

    monkeypatch.setattr(inference, "run_prediction", slow_predict)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert widget.runner.is_running() and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: len(seen_progress) >= 3, timeout=20000)
    assert len(ticks) >= 5, "the GUI thread was blocked while the network ran"
    assert widget.runner.progress_bar.maximum() == ct.data.shape[0]
    qtbot.mouseClick(widget.runner.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=20000)
    timer.stop()
    assert len(seen_progress) < ct.data.shape[0]
    assert "unet lung" not in viewer.layers and "unet infection" not in viewer.layers
    assert "cancelled" in widget.runner.status_label.text().lower()
    assert messages == []
    assert widget.run_button.isEnabled()


def test_errors_become_notifications(make_napari_viewer, qtbot, tiny_phantom, tiny_unet_checkpoints,
                                     isolated_catalog, messages, tmp_path):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget.set_network("unet")
    widget.weights.use_file(tiny_unet_checkpoints["trained"])
    widget.set_device("cpu")
    # no CT layer
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert len(messages) == 1 and "No CT layer" in messages[-1]
    # a 2D image instead of a volume
    viewer.add_image(tiny_phantom.ct[5], name="one slice")
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "3D CT volume" in messages[-1] and not widget.runner.is_running()
    # CUDA asked for on a machine without it (or a GPU index that does not exist)
    viewer.add_image(tiny_phantom.ct, name="CT", scale=tiny_phantom.spacing)
    widget.ct_combo.set_layer(viewer.layers["CT"])
    widget.set_device("cuda:7")
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "cuda:7" in messages[-1]
    widget.set_device("cpu")
    # a damaged checkpoint is refused when browsed to
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    n = len(messages)
    assert widget.weights.use_file(junk) is None
    assert len(messages) == n + 1 and "junk.pt" in messages[-1]
    # a checkpoint that breaks at load time (file replaced after being chosen) fails in the worker
    broken = tmp_path / "broken.pt"
    import shutil

    shutil.copy(tiny_unet_checkpoints["random"], broken)
    widget.weights.use_file(broken)
    broken.write_bytes(b"garbage")
    _click_and_wait(qtbot, widget)
    assert "broken.pt" in messages[-1]
    assert "Traceback" not in messages[-1]
    assert "Failed" in widget.runner.status_label.text()
    assert "unet lung" not in viewer.layers
    # normalised (not HU) intensities: a warning, then it still runs
    viewer.add_image((tiny_phantom.ct + 1024) / 4000.0, name="normalised", scale=tiny_phantom.spacing)
    widget.ct_combo.set_layer(viewer.layers["normalised"])
    widget.weights.select_path(tiny_unet_checkpoints["random"]) or widget.weights.use_file(tiny_unet_checkpoints["random"])
    _click_and_wait(qtbot, widget)
    assert any("Hounsfield" in m for m in messages)
    assert "unet lung" in viewer.layers


def test_catalog_changes_reach_the_widget(make_napari_viewer, tiny_unet_checkpoints, isolated_catalog, messages):
    viewer = make_napari_viewer()
    # opened the way a user does (Plugins menu -> npe2 manifest)
    _, widget = viewer.window.add_plugin_dock_widget("napari-covidseg", "Segment")
    assert isinstance(widget, SegmentWidget)
    from napari_covidseg.widgets.side_by_side_widget import SideBySideWidget

    _, side_by_side = viewer.window.add_plugin_dock_widget("napari-covidseg", "Side by side")
    assert isinstance(side_by_side, SideBySideWidget)
    widget.set_network("unet")
    before = widget.weights.combo.count()
    # the Training widget registers its finished checkpoint: it is listed at once
    isolated_catalog.add_checkpoint(tiny_unet_checkpoints["trained"])
    for combo in (widget.weights.combo, side_by_side.network_weights["unet"].combo):
        labels = [combo.itemText(i) for i in range(combo.count())]
        assert any("trained.pt" in t for t in labels)
    shipped = isolated_catalog.shipped_entry("unet") is not None
    assert widget.weights.combo.count() == (2 if shipped else 1)
    assert before == 1
    # the shipped weights (when there are some) stay the default pick
    assert widget.weights.current_entry().shipped == shipped


def test_rewritten_checkpoint_refreshes_the_shown_info(make_napari_viewer, tiny_unet_checkpoints, isolated_catalog,
                                                       tmp_path, messages):
    """best.pt rewritten by a resumed run: the selected entry keeps its path but the info is new."""
    import shutil

    from napari_covidseg.checkpoint import load_checkpoint, save_checkpoint

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget.set_network("unet")
    path = tmp_path / "best.pt"
    shutil.copy(tiny_unet_checkpoints["trained"], path)
    isolated_catalog.add_checkpoint(path)
    assert widget.weights.select_path(str(path))
    old = load_checkpoint(path)
    save_checkpoint(path, old.model, "unet", old.network_kwargs, old.preprocessing,
                    training={"data": "resumed-run-data"}, metrics={"val_dice_mean": 0.777})
    isolated_catalog.add_checkpoint(path)
    assert widget.weights.current_path() == str(path)
    assert "resumed-run-data" in widget.weights_info.toolTip() and "0.777" in widget.weights_info.toolTip()


def test_hu_weights_are_refused_for_an_8bit_image_before_running(make_napari_viewer, tiny_unet_checkpoints, messages):
    from napari_covidseg.intensity import DOMAIN_KEY

    viewer = make_napari_viewer()
    eight_bit = np.random.default_rng(0).integers(0, 256, (4, 48, 48)).astype(np.uint8)
    viewer.add_image(eight_bit, name="slices [8-bit, not HU]", metadata={DOMAIN_KEY: "display8"})
    widget = _widget(viewer, tiny_unet_checkpoints["trained"])
    assert widget.run() is None and not widget.runner.is_running()
    assert any("HU cannot be recovered" in m and "8-bit" in m for m in messages)
    assert [layer.name for layer in viewer.layers] == ["slices [8-bit, not HU]"]
