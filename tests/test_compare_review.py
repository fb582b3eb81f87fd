"""Compare over the CT's texture: outlines, hidden sources, reference colours, review keys."""

import os

import numpy as np
from qtpy.QtCore import Qt

from napari_covidseg.widgets.compare_display import OUTLINE_PX
from napari_covidseg.widgets.compare_widget import CompareWidget
from napari_covidseg.widgets.layer_style import REFERENCE_COLORS

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


def _press(viewer, qtbot, key, shift=False):
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, key, Qt.ShiftModifier if shift else Qt.NoModifier)


def _compared(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    gt = viewer.layers["phantom infection GT"]
    truth = np.asarray(gt.data)
    pred_data = np.zeros_like(truth)
    pred_data[:, :, : truth.shape[2] // 2 + 8] = truth[:, :, : truth.shape[2] // 2 + 8]  # misses part of it
    pred_data[12, 60:66, 60:66] = 1  # and adds a blob
    pred = viewer.add_labels(pred_data, name="unet infection", scale=gt.scale, opacity=0.5,
                             metadata={"covidseg_source": {"network": "unet"}})
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.pred_combo.set_layer(pred)
    widget.gt_combo.set_layer(gt)
    qtbot.mouseClick(widget.compare_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.hd95_pending(), timeout=30000)
    return viewer, widget, pred, gt


def test_sources_hidden_reference_colours_and_restore(make_napari_viewer, qtbot):
    viewer, widget, pred, gt = _compared(make_napari_viewer, qtbot)
    overlay = widget.overlay_layer
    assert overlay is not None and overlay.visible
    # only the overlay is seen; the prediction stays paintable (visible, transparent)
    assert not gt.visible and pred.visible and pred.opacity == 0.0
    np.testing.assert_allclose(gt.colormap.map(np.array([1]))[0], REFERENCE_COLORS["infection"], atol=1e-6)
    widget.hide_check.setChecked(False)
    assert gt.visible and pred.opacity == 0.5
    widget.hide_check.setChecked(True)
    viewer.layers.remove(gt)  # the comparison ends: the prediction looks as before
    assert pred.opacity == 0.5 and pred.visible


def test_review_keys_outlines_overlay_and_worst_slices(make_napari_viewer, qtbot):
    viewer, widget, pred, gt = _compared(make_napari_viewer, qtbot)
    overlay = widget.overlay_layer
    _press(viewer, qtbot, Qt.Key_C, shift=True)
    assert widget.outline_check.isChecked()
    assert overlay.contour == OUTLINE_PX and pred.contour == OUTLINE_PX and gt.contour == OUTLINE_PX
    os.makedirs(SCREENSHOTS, exist_ok=True)
    widget.go_to_slice(12)
    qtbot.wait(50)
    viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "compare_outlines.png"))
    _press(viewer, qtbot, Qt.Key_O, shift=True)
    assert not overlay.visible and not widget.overlay_check.isChecked()
    _press(viewer, qtbot, Qt.Key_O, shift=True)
    assert overlay.visible
    ranking = list(widget.ranking)
    assert len(ranking) >= 3
    _press(viewer, qtbot, Qt.Key_N)
    assert widget.current_slice() == ranking[0]
    _press(viewer, qtbot, Qt.Key_N)
    assert widget.current_slice() == ranking[1]
    _press(viewer, qtbot, Qt.Key_N, shift=True)
    assert widget.current_slice() == ranking[0]
    qtbot.mouseClick(widget.previous_worst_button, Qt.LeftButton)
    assert widget.current_slice() == ranking[-1]  # cycles
    _press(viewer, qtbot, Qt.Key_C, shift=True)
    assert overlay.contour == 0 and pred.contour == 0
