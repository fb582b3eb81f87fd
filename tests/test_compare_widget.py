"""Compare-to-ground-truth widget driven through its buttons on the small phantom."""

import csv
import os
import time

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent
from scipy import ndimage

from napari_covidseg import metrics
from napari_covidseg.overlay import METRIC_COLUMNS

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


@pytest.fixture
def phantom_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    return viewer


def _make_prediction(viewer):
    """A prediction with known errors: the infection GT dilated, one lesion deleted, a false blob."""
    gt_layer = viewer.layers["phantom infection GT"]
    gt = np.asarray(gt_layer.data) != 0
    pred = ndimage.binary_dilation(gt, iterations=1)
    labels, n = ndimage.label(gt)
    assert n >= 2, "the phantom should have several lesions"
    sizes = ndimage.sum(gt, labels, range(1, n + 1))
    pred[ndimage.binary_dilation(labels == int(np.argmin(sizes)) + 1, iterations=2)] = False  # miss one
    z, y, x = (s // 2 for s in gt.shape)
    pred[z, y - 2 : y + 2, x - 2 : x + 2] = True  # a false positive blob on the middle slice
    layer = viewer.add_labels(pred.astype(np.uint8), name="prediction", scale=gt_layer.scale, translate=gt_layer.translate)
    layer.metadata.update(gt_layer.metadata)
    return layer


def _table_value(widget, key, column):
    row = [k for k, _ in METRIC_COLUMNS].index(key)
    return widget.table.item(row, column).text()


def _compare(viewer, qtbot):
    from napari_covidseg.widgets.compare_widget import CompareWidget

    pred = _make_prediction(viewer)
    widget = CompareWidget(viewer)
    qtbot.addWidget(widget)
    widget.pred_combo.set_layer(pred)
    widget.gt_combo.set_layer(viewer.layers["phantom infection GT"])
    widget.compare_button.click()
    qtbot.waitUntil(lambda: not widget.hd95_pending(), timeout=20000)
    return widget, pred, viewer.layers["phantom infection GT"]


def test_overlay_values_exact_colours_and_screenshot(make_napari_viewer, qtbot):
    from napari_covidseg.widgets.compare_widget import CompareWidget

    viewer = make_napari_viewer(show=True)  # a hidden canvas is not drawn: the screenshot needs it
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    pred = _make_prediction(viewer)
    gt = viewer.layers["phantom infection GT"]
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Compare to ground truth")
    widget.pred_combo.set_layer(pred)
    widget.gt_combo.set_layer(gt)
    widget.compare_button.click()
    qtbot.waitUntil(lambda: not widget.hd95_pending(), timeout=20000)

    overlay = viewer.layers["prediction vs phantom infection GT"]
    p, g = pred.data != 0, gt.data != 0
    assert np.array_equal(overlay.data == 1, p & g)
    assert np.array_equal(overlay.data == 2, g & ~p)
    assert np.array_equal(overlay.data == 3, p & ~g)
    assert np.array_equal(overlay.data == 0, ~p & ~g)
    assert tuple(overlay.scale) == tuple(gt.scale)
    assert viewer.layers.selection.active is pred  # the brush stays on the prediction
    mapped = np.round(np.asarray(overlay.colormap.map(np.array([1, 2, 3]))) * 255).astype(int)
    assert mapped.tolist() == [[0, 255, 0, 255], [255, 0, 0, 255], [255, 255, 0, 255]]
    assert np.asarray(overlay.colormap.map(np.array([0])))[0, 3] == 0  # background transparent

    # What is drawn on screen: only the overlay, fully opaque, on a slice with all three values.
    z = int(np.argmax([(len(np.unique(s)) == 4) for s in overlay.data]))
    assert set(np.unique(overlay.data[z])) == {0, 1, 2, 3}
    for layer in viewer.layers:
        layer.visible = layer is overlay
    opacity, overlay.opacity = overlay.opacity, 1.0
    widget.go_to_slice(z)
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(shot, axis=0)}
    assert {(0, 255, 0), (255, 0, 0), (255, 255, 0)} <= colours

    # The picture for the docs: the CT and the overlay on a bad slice showing all three colours.
    overlay.opacity = opacity
    viewer.layers["phantom CT"].visible = True
    widget.worst_button.click()
    while len(np.unique(overlay.data[viewer.dims.current_step[0]])) < 4 and widget.rank_position < len(widget.ranking) - 1:
        widget.next_worst_button.click()
    viewer.camera.zoom *= 1.5
    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(200)
    assert viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "compare_widget.png"))


def _check_worst_slice_buttons(viewer, widget, pred, gt):
    dice = metrics.per_slice_dice(pred.data != 0, gt.data != 0)
    order = [z for z in np.argsort(np.where(np.isnan(dice), np.inf, dice), kind="stable") if not np.isnan(dice[z])]
    widget.worst_button.click()
    assert viewer.dims.current_step[0] == int(np.nanargmin(dice)) == order[0]
    widget.next_worst_button.click()
    assert viewer.dims.current_step[0] == order[1]
    assert dice[order[1]] >= dice[order[0]]
    for _ in range(len(order) - 1):
        widget.next_worst_button.click()
    assert viewer.dims.current_step[0] == order[0]  # cycles


def _check_plot_click(viewer, widget, pred, gt):
    target = pred.data.shape[0] - 3
    widget.plot.draw()
    x, y = widget.plot.ax.transData.transform((target + 0.2, 0.5))
    event = MouseEvent("button_press_event", widget.plot, x, y, button=1)
    widget.plot.callbacks.process("button_press_event", event)
    assert viewer.dims.current_step[0] == target
    assert widget.plot.marker.get_xdata()[0] == target


def test_metrics_shown_equal_metrics_module(phantom_viewer, qtbot):
    viewer = phantom_viewer
    widget, pred, gt = _compare(viewer, qtbot)
    p, g = pred.data != 0, gt.data != 0
    spacing = tuple(gt.scale)
    expected_volume = {
        "dice": metrics.dice(p, g),
        "iou": metrics.iou(p, g),
        "sensitivity": metrics.sensitivity(p, g),
        "specificity": metrics.specificity(p, g),
        "precision": metrics.precision(p, g),
    }
    for key, value in expected_volume.items():
        assert _table_value(widget, key, 1) == f"{value:.3f}"
        assert widget.volume_metrics[key] == pytest.approx(value)
    assert widget.volume_metrics["hd95_mm"] == pytest.approx(metrics.hd95(p, g, spacing))
    assert _table_value(widget, "hd95_mm", 1) == f"{metrics.hd95(p, g, spacing):.1f}"

    # Current slice = the slice with the false blob; then move to another slice.
    for z in (p.shape[0] // 2, int(np.flatnonzero(g.any(axis=(1, 2))).min())):
        widget.go_to_slice(z)
        assert viewer.dims.current_step[0] == z
        assert widget.table.horizontalHeaderItem(0).text() == f"Slice {z}"
        assert _table_value(widget, "dice", 0) == f"{metrics.dice(p[z], g[z]):.3f}"
        assert _table_value(widget, "precision", 0) == f"{metrics.precision(p[z], g[z]):.3f}"
        assert widget.slice_values["hd95_mm"] == pytest.approx(metrics.hd95(p[z], g[z], spacing[1:]))

    np.testing.assert_allclose(widget.slice_dice, metrics.per_slice_dice(p, g), equal_nan=True)

    _check_worst_slice_buttons(viewer, widget, pred, gt)
    _check_plot_click(viewer, widget, pred, gt)


def _check_edit_burst(viewer, widget, pred, gt, qtbot):
    g = gt.data != 0
    n = pred.data.shape[0]
    for z in range(n // 2 - 2, n // 2 + 2):  # quick strokes on four slices, a volume update per stroke
        pred.data[z] = g[z]
        pred.refresh()
        pred.events.paint(value=[])
        widget.go_to_slice(z)
        widget._edits.stop()
        widget._after_edit()  # what the debounce timer would call
    qtbot.waitUntil(lambda: not widget.hd95_pending(), timeout=20000)
    p = pred.data != 0
    assert widget.volume_metrics["dice"] == pytest.approx(metrics.dice(p, g))
    assert widget.volume_metrics["hd95_mm"] == pytest.approx(metrics.hd95(p, g, tuple(gt.scale)))
    np.testing.assert_allclose(widget.slice_dice, metrics.per_slice_dice(p, g), equal_nan=True)
    overlay = viewer.layers["prediction vs phantom infection GT"]
    assert np.array_equal(overlay.data == 3, p & ~g)


def test_painting_updates_numbers(phantom_viewer, qtbot):
    viewer = phantom_viewer
    widget, pred, gt = _compare(viewer, qtbot)
    z = pred.data.shape[0] // 2
    widget.go_to_slice(z)
    before = widget.slice_values["dice"]
    viewer.layers["prediction vs phantom infection GT"].opacity = 0.3  # the user's choice stays
    # Paint the ground truth of this slice into the prediction, as the brush would.
    g = gt.data != 0
    pred.data[z][g[z]] = 1
    pred.data[z][~g[z]] = 0
    pred.refresh()
    pred.events.paint(value=[])
    qtbot.waitUntil(lambda: widget.slice_values.get("dice") == 1.0, timeout=5000)
    assert before < 1.0
    assert _table_value(widget, "dice", 0) == "1.000"
    assert widget.slice_dice[z] == 1.0
    overlay = viewer.layers["prediction vs phantom infection GT"]
    assert not np.isin(overlay.data[z], [2, 3]).any()
    qtbot.waitUntil(lambda: not widget.hd95_pending(), timeout=20000)
    p = pred.data != 0
    assert widget.volume_metrics["dice"] == pytest.approx(metrics.dice(p, g))
    assert overlay.opacity == pytest.approx(0.3) and overlay is viewer.layers[-1]

    # The real brush: Labels.paint emits the same event at the end of the stroke.
    pred.selected_label = 1
    pred.brush_size = 3
    y, x = 1, 1  # a corner far from the lungs
    pred.paint((z, y, x), 1)
    qtbot.waitUntil(lambda: widget.slice_values.get("dice", 1.0) < 1.0, timeout=5000)
    assert widget.slice_values["dice"] == pytest.approx(metrics.dice(pred.data[z] != 0, g[z]))

    _check_edit_burst(viewer, widget, pred, gt, qtbot)


def _check_export_button(viewer, widget, pred, gt, qtbot, tmp_path, monkeypatch):
    from napari_covidseg.widgets import compare_widget

    path = tmp_path / "worker.csv"
    monkeypatch.setattr(compare_widget.QFileDialog, "getSaveFileName", lambda *a, **k: (str(path), ""))
    widget.export_button.click()
    qtbot.waitUntil(lambda: not widget.export_running(), timeout=20000)
    assert path.exists() and str(path) in widget.status.text()
    assert path.read_text() == open(widget.export_csv(tmp_path / "direct.csv")).read()
    assert widget.runner.isHidden()

    before = path.read_text()
    path.write_text("keep me")
    monkeypatch.setattr(compare_widget, "ask_overwrite", lambda *a: False)
    widget.export_button.click()
    assert not widget.export_running() and path.read_text() == "keep me"
    monkeypatch.setattr(compare_widget, "ask_overwrite", lambda *a: True)
    widget.export_button.click()
    qtbot.waitUntil(lambda: not widget.export_running(), timeout=20000)
    assert path.read_text() == before


def _check_export_cancel(viewer, widget, pred, gt, qtbot, tmp_path, monkeypatch):
    real_hd95 = metrics.hd95

    def slow_hd95(*args, **kwargs):
        time.sleep(0.2)
        return real_hd95(*args, **kwargs)

    monkeypatch.setattr(metrics, "hd95", slow_hd95)
    path = tmp_path / "cancelled.csv"
    widget.start_export(path)
    assert widget.export_running() and not widget.runner.isHidden()
    widget.runner.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.export_running(), timeout=20000)
    assert not path.exists()
    assert "cancelled" in widget.status.text()


def test_exports(phantom_viewer, qtbot, tmp_path, monkeypatch):
    viewer = phantom_viewer
    widget, pred, gt = _compare(viewer, qtbot)
    path = widget.export_csv(tmp_path / "metrics.csv")
    rows = list(csv.reader(open(path)))
    n = pred.data.shape[0]
    assert rows[0][:7] == ["slice", "dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm"]
    assert len(rows) == n + 2
    dice = metrics.per_slice_dice(pred.data != 0, gt.data != 0)
    for z in range(n):
        cell = rows[1 + z][1]
        assert (cell == "") if np.isnan(dice[z]) else float(cell) == pytest.approx(dice[z])
    assert rows[-1][0] == "volume"
    assert float(rows[-1][1]) == pytest.approx(widget.volume_metrics["dice"])
    assert float(rows[-1][6]) == pytest.approx(widget.volume_metrics["hd95_mm"])
    with pytest.raises(Exception, match="exists"):
        widget.export_csv(path)
    _check_export_button(viewer, widget, pred, gt, qtbot, tmp_path, monkeypatch)
    _check_export_cancel(viewer, widget, pred, gt, qtbot, tmp_path, monkeypatch)


def _check_combos_follow_layers(viewer, widget):
    names = lambda: [widget.gt_combo.itemText(i) for i in range(widget.gt_combo.count())]
    assert "phantom infection GT" in names() and "phantom CT" not in names()
    layer = viewer.add_labels(np.zeros((2, 2, 2), np.uint8), name="new mask")
    assert "new mask" in names()
    layer.name = "renamed"
    assert "renamed" in names()
    viewer.layers.remove(layer)
    assert "renamed" not in names()


def test_shape_mismatch_and_combos(phantom_viewer, qtbot, monkeypatch):
    from napari_covidseg.widgets import compare_widget

    viewer = phantom_viewer
    messages = []
    monkeypatch.setattr(compare_widget, "notify_error", lambda e: messages.append(str(e)))
    # napari builds the widget from the manifest; the drop-downs start on a sensible pair.
    _make_prediction(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-covidseg", "Compare to ground truth")
    assert isinstance(widget, compare_widget.CompareWidget)
    assert widget.pred_combo.current_layer().name == "prediction"
    assert widget.gt_combo.current_layer().name in ("phantom lung GT", "phantom infection GT")
    other = viewer.add_labels(np.zeros((3, 4, 5), np.uint8), name="small")
    widget.pred_combo.set_layer(other)
    widget.gt_combo.set_layer(viewer.layers["phantom infection GT"])
    widget.compare_button.click()
    assert messages and "shape" in messages[0]
    assert "small vs phantom infection GT" not in viewer.layers
    _check_combos_follow_layers(viewer, widget)


def _network_mask(viewer, name, cls):
    reference = viewer.layers[f"phantom {cls} GT"]
    layer = viewer.add_labels(np.asarray(reference.data).copy(), name=name, scale=reference.scale)
    layer.metadata["covidseg_source"] = {"network": "unet", "class": cls}
    return layer


def test_the_pick_follows_a_segmentation_that_arrives_after_the_ground_truth(phantom_viewer, qtbot):
    """Open the ground truth, open Compare, then segment: the prediction offered is the network's
    mask of the reference's class (not the reference itself, nor the other class); a reference
    picked by hand brings its class's mask along; a prediction picked by hand stays."""
    from napari_covidseg.widgets.compare_widget import CompareWidget

    viewer = phantom_viewer
    widget = CompareWidget(viewer)
    qtbot.addWidget(widget)
    reference = widget.gt_combo.current_layer()
    assert reference.name in ("phantom lung GT", "phantom infection GT")
    cls = "lung" if "lung" in reference.name else "infection"
    other = "infection" if cls == "lung" else "lung"
    _network_mask(viewer, f"unet {other}", other)
    _network_mask(viewer, f"unet {cls}", cls)
    assert widget.gt_combo.current_layer() is reference
    assert widget.pred_combo.current_layer().name == f"unet {cls}"
    widget.gt_combo.set_layer(viewer.layers[f"phantom {other} GT"])
    assert widget.pred_combo.current_layer().name == f"unet {other}"
    widget.pred_combo.set_layer(viewer.layers[f"unet {cls}"])  # the user's own pair stays
    _network_mask(viewer, "unet infection [2]", "infection")
    assert widget.pred_combo.current_layer().name == f"unet {cls}"
