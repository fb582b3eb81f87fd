"""Side-by-side widget: several networks, one tile each (CT + mask), metrics table, cancel, restore."""

import csv
import dataclasses
import os
import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_covidseg.io.geometry import GEOMETRY_KEY
from napari_covidseg.metrics import all_metrics
from napari_covidseg.models import registry
from napari_covidseg.widgets import common, side_by_side_widget, weights_combo
from napari_covidseg.widgets.side_by_side_widget import SideBySideWidget

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


@pytest.fixture
def messages(monkeypatch):
    shown = []
    for module in (side_by_side_widget, common, weights_combo):
        monkeypatch.setattr(module, "notify_error", lambda e, shown=shown: shown.append(common.error_text(e)))
    return shown


@pytest.fixture
def two_networks(monkeypatch, tiny_unet_checkpoints, isolated_catalog, tmp_path):
    """A second registered network (a U-Net under another name) so two networks can be compared
    whatever else is registered; each gets its own tiny checkpoint in the catalog."""
    from napari_covidseg.checkpoint import load_checkpoint, save_checkpoint

    registry.get_network("unet")
    twin = dataclasses.replace(registry.get_network("unet"), name="unet_twin", title="U-Net (twin for tests)")
    monkeypatch.setitem(registry._REGISTRY, "unet_twin", twin)
    random = load_checkpoint(tiny_unet_checkpoints["random"])
    twin_path = save_checkpoint(tmp_path / "twin.pt", random.model, "unet_twin", random.network_kwargs,
                                preprocessing=random.preprocessing)
    isolated_catalog.add_checkpoint(twin_path)
    isolated_catalog.add_checkpoint(tiny_unet_checkpoints["trained"])
    return {"unet": tiny_unet_checkpoints["trained"], "unet_twin": str(twin_path)}


def _setup(make_napari_viewer, phantom, checkpoints):
    viewer = make_napari_viewer()
    ct = viewer.add_image(phantom.ct, name="phantom CT", scale=phantom.spacing, contrast_limits=(-1350, 150),
                          metadata={GEOMETRY_KEY: phantom.geometry})
    lung_gt = viewer.add_labels(phantom.lung, name="phantom lung GT", scale=phantom.spacing)
    inf_gt = viewer.add_labels(phantom.infection, name="phantom infection GT", scale=phantom.spacing)
    widget = SideBySideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Side by side")
    widget.set_networks(list(checkpoints))
    for name, path in checkpoints.items():
        assert widget.network_weights[name].select_path(path)
    widget.set_device("cpu")
    return viewer, ct, lung_gt, inf_gt, widget


def test_grid_tiles_table_and_restore(make_napari_viewer, qtbot, tiny_phantom, two_networks, messages, tmp_path):
    viewer, ct, lung_gt, inf_gt, widget = _setup(make_napari_viewer, tiny_phantom, two_networks)
    assert widget.infection_gt_combo.current_layer() is inf_gt
    assert widget.lung_gt_combo.current_layer() is lung_gt
    widget.set_class("lung")
    inf_gt.visible = False  # the user's own visibility choice must come back after Clear
    before = [(layer.name, layer.visible) for layer in viewer.layers]

    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=60000)
    assert messages == []
    grid = viewer.canvas.grid
    assert grid.enabled and abs(grid.stride) == 2
    # tiles: ground truth + one per network, each = (CT copy, mask)
    visible = [layer for layer in viewer.layers if layer.visible]
    assert len(visible) == 2 * 3
    rows, cols = grid.actual_shape(viewer.layers)
    assert rows * cols >= 3
    tiles = {}
    for i, layer in enumerate(viewer.layers):
        if layer.visible:
            tiles.setdefault(grid.position(i, viewer.layers), []).append(layer)
    assert len(tiles) == 3
    tile_contents = [sorted(type(l).__name__ for l in t) for t in tiles.values()]
    assert all(c == ["Image", "Labels"] for c in tile_contents)
    for t in tiles.values():
        image = [l for l in t if type(l).__name__ == "Image"][0]
        assert image.data is ct.data  # the CT is shared, not copied
        np.testing.assert_allclose(image.scale, ct.scale)
    # the first tile (top-left) is the ground truth, then the networks in list order
    first = tiles[(0, 0)]
    assert any(l.name == "ground truth" for l in first)

    # names carry the Dice; the table (one column per network) matches napari_covidseg.metrics
    assert widget.table.columnCount() == 2
    for row, result in enumerate(widget.results):
        mask_layer = [l for l in viewer.layers if l.name.startswith(f"{result.network} — Dice")][0]
        assert mask_layer.data.shape == ct.data.shape and mask_layer.metadata[GEOMETRY_KEY] is tiny_phantom.geometry
        assert mask_layer.name_overlay.visible
        expected = all_metrics(mask_layer.data, tiny_phantom.lung, spacing=tiny_phantom.spacing)
        assert f"Dice {expected['dice']:.2f}" in mask_layer.name
        for key in ("dice", "iou", "sensitivity", "specificity", "precision"):
            assert float(widget.cell(key, result.network)) == pytest.approx(expected[key], abs=6e-4)
        hd95 = widget.cell("hd95_mm", result.network)  # 0.1 mm, never "46.074"
        assert hd95 == "—" or (len(hd95.split(".")[1]) == 1 and float(hd95) == pytest.approx(expected["hd95_mm"], abs=0.05))
        header = widget.table.horizontalHeaderItem(row)
        assert header.text().replace("\n", " ") == registry.get_network(result.network).title.split(" (")[0]
        assert result.weights_path in header.toolTip()
    # the best Dice of the row is bold; every row is visible without scrolling
    dice_items = [widget.table.item(0, c) for c in range(2)]
    assert sum(item.font().bold() for item in dice_items) == 1
    assert widget.table.height() >= widget.table.verticalHeader().length()
    trained = [r for r in widget.results if r.network == "unet"][0]
    assert trained.metrics["dice"] > 0.6  # the briefly trained net finds the lungs

    # one set of dims: every tile shows the same slice
    viewer.dims.set_point(0, ct.scale[0] * 3)
    for layer in tiles[(0, 0)]:
        assert layer._slice_input.world_slice.point[0] == pytest.approx(ct.scale[0] * 3)

    out = tmp_path / "metrics.csv"
    widget.export_csv(out)
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["network"] for r in rows] == [r.network for r in widget.results]
    assert float(rows[0]["dice"]) == pytest.approx(widget.results[0].metrics["dice"])
    assert rows[0]["class"] == "lung"

    os.makedirs(SCREENSHOTS, exist_ok=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.dims.set_point(0, ct.scale[0] * (ct.data.shape[0] // 2))
    viewer.reset_view()
    qtbot.wait(50)
    viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "side_by_side_widget.png"))

    # running again replaces the tiles instead of adding more
    n_layers = len(viewer.layers)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=60000)
    assert len(viewer.layers) == n_layers

    qtbot.mouseClick(widget.clear_button, Qt.LeftButton)
    assert not grid.enabled
    assert [(layer.name, layer.visible) for layer in viewer.layers] == before


def test_cancel_and_errors(make_napari_viewer, qtbot, tiny_phantom, two_networks, messages, monkeypatch, tmp_path):
    viewer, ct, lung_gt, inf_gt, widget = _setup(make_napari_viewer, tiny_phantom, two_networks)
    from napari_covidseg import inference

    real_predict = inference.run_prediction
    calls = []

    def slow_predict(*args, progress=None, should_cancel=None, **kwargs):
        def slow(done, total):
            calls.append(done)
            progress(done, total)
            time.sleep(0.15)

        return real_predict(*args, progress=slow, should_cancel=should_cancel, batch_size=1, **kwargs)

    monkeypatch.setattr(inference, "run_prediction", slow_predict)
    n_layers = len(viewer.layers)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: len(calls) >= 2, timeout=20000)
    qtbot.mouseClick(widget.runner.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=20000)
    assert len(calls) < 2 * ct.data.shape[0]
    assert len(viewer.layers) == n_layers and not viewer.canvas.grid.enabled
    assert "cancelled" in widget.runner.status_label.text().lower()
    assert widget.table.columnCount() == 0 and messages == []
    monkeypatch.setattr(inference, "run_prediction", real_predict)

    # "Add checkpoint...": a checkpoint lands in its own network's row, ticked and selected
    widget.set_networks([])
    entry = widget.use_checkpoint(two_networks["unet_twin"])
    assert entry.network == "unet_twin"
    assert widget.network_checks["unet_twin"].isChecked() and not widget.network_checks["unet"].isChecked()
    assert widget.network_weights["unet_twin"].current_path() == os.path.abspath(two_networks["unet_twin"])
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    assert widget.use_checkpoint(not_a_checkpoint) is None
    assert "notes.pt" in messages[-1] and "Traceback" not in messages[-1]
    messages.clear()

    widget.set_networks([])
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "Tick at least one network" in messages[-1]
    widget.set_networks(["unet"])
    # a ground truth of another shape
    viewer.add_labels(np.zeros((3, 4, 4), np.uint8), name="other infection GT")
    widget.infection_gt_combo.set_layer(viewer.layers["other infection GT"])
    widget.set_class("infection")
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "has shape (3, 4, 4)" in messages[-1]
    assert not widget.runner.is_running() and not viewer.canvas.grid.enabled
    # without ground truth: tiles and times, no metrics
    widget.infection_gt_combo.set_layer(None)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=60000)
    assert widget.table.columnCount() == 1 and widget.cell("dice", "unet") == "—"
    assert "unet infection" in viewer.layers and viewer.canvas.grid.enabled


def test_default_ticks_and_presets_on_every_tile(make_napari_viewer, qtbot, tiny_phantom, two_networks, messages):
    from napari_covidseg.widgets.window_widget import WindowWidget
    from napari_covidseg.windowing import contrast_limits

    viewer = make_napari_viewer()
    fresh = SideBySideWidget(viewer)
    qtbot.addWidget(fresh)
    ticked = [name for name, check in fresh.network_checks.items() if check.isChecked()]
    assert 1 <= len(ticked) <= 2 and len(ticked) < len(fresh.network_checks)  # not every network at once
    if fresh.network_weights["unet"].current_path():
        assert "unet" in ticked

    viewer, ct, lung_gt, inf_gt, widget = _setup(make_napari_viewer, tiny_phantom, two_networks)
    window = WindowWidget(viewer)
    qtbot.addWidget(window)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.is_running(), timeout=60000)
    tiles = [layer for layer in viewer.layers if layer.metadata.get(side_by_side_widget.SIDE_BY_SIDE_KEY)
             and type(layer).__name__ == "Image"]
    assert len(tiles) == 3
    qtbot.mouseClick(window.buttons["mediastinum"], Qt.LeftButton)
    for layer in tiles + [ct]:
        assert tuple(layer.contrast_limits) == contrast_limits("mediastinum")


def test_hd95_unit_follows_the_chosen_ct_before_any_run(make_napari_viewer, qtbot):
    """8-bit slices with a placeholder voxel size: HD95 is in pixels, and the table says so before
    the first run as it does after it."""
    from napari_covidseg.io.geometry import SPACING_KNOWN_KEY

    viewer = make_napari_viewer()
    hu = viewer.add_image(np.zeros((2, 8, 8), np.int16), name="CT in HU")
    display8 = viewer.add_image(np.zeros((2, 8, 8), np.uint8), name="8-bit slices",
                                metadata={SPACING_KNOWN_KEY: False})
    widget = SideBySideWidget(viewer)
    qtbot.addWidget(widget)
    header = lambda: widget.table.verticalHeaderItem(
        [row[1] for row in side_by_side_widget.TABLE_ROWS].index("hd95_mm")).text()
    widget.ct_combo.set_layer(display8)
    assert header() == "HD95 (px)"
    widget.ct_combo.set_layer(hu)
    assert header() == "HD95 (mm)"
