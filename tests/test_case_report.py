"""One-click case report from the Quantify widget: key slices with the masks, the table, the
network and its card, as PNG + CSV."""

import csv
import os

import numpy as np
from qtpy.QtCore import Qt

from napari_covidseg import weights_catalog
from napari_covidseg.report import key_slices
from napari_covidseg.widgets.edits import watch_edits
from napari_covidseg.widgets.quantify_widget import QuantifyWidget

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


def test_key_slices_most_infection_spread_out():
    lung = np.zeros((20, 8, 8), np.uint8)
    lung[2:18] = 1
    inf = np.zeros_like(lung)
    inf[10, :4, :4] = 1  # 16 voxels
    inf[11, :3, :3] = 1  # next to it: skipped for being too close
    inf[4, :2, :2] = 1
    inf[16, :1, :2] = 1
    assert key_slices(lung, inf, n=3) == [16, 10, 4]  # superior first
    assert len(key_slices(lung, np.zeros_like(inf))) >= 2  # no infection: through the lungs


def test_report_png_and_csv(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    ct, gt = viewer.layers["phantom CT"], viewer.layers["phantom infection GT"]
    shipped = weights_catalog.shipped_entry("unet")
    prediction = viewer.add_labels(np.asarray(gt.data).copy(), name="unet infection", scale=ct.scale,
                                   metadata={"covidseg_source": {"network": "unet", "class": "infection",
                                                                 "weights": shipped.path, "threshold": 0.5}})
    watch_edits(prediction)
    widget = QuantifyWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.infection_combo.current_layer() is prediction  # the network's mask before a file's
    assert not widget.report_button.isEnabled()  # nothing computed yet
    widget.lung_combo.set_layer(viewer.layers["phantom lung GT"])
    widget.ct_combo.set_layer(ct)
    widget.compute_button.click()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=10000)
    target = tmp_path / "phantom_CT_report.png"
    monkeypatch.setattr("napari_covidseg.widgets.quantify_widget.QFileDialog.getSaveFileName",
                        lambda *a, **k: (str(target), ""))
    qtbot.mouseClick(widget.report_button, Qt.LeftButton)
    assert target.is_file() and target.with_suffix(".csv").is_file()
    assert "Report written" in widget.status.text()
    from skimage.io import imread

    image = imread(target)
    assert image.shape[0] > 600 and image.shape[1] > 900
    rows = {r[0]: r[1] for r in list(csv.reader(open(target.with_suffix(".csv"))))[1:]}
    assert rows["severity_grade"] == widget.result["severity_grade"]
    assert float(rows["infection_ml"]) == float(f"{widget.result['infection_ml']:.6g}")
    card = " | ".join(v for k, v in rows.items() if k.startswith("segmentation_"))
    assert "Network: U-Net" in card and "Shipped weights: trained on" in card
    if weights_catalog.phantom_only(shipped.info):
        assert "not validated on patient CT" in card
    os.makedirs(SCREENSHOTS, exist_ok=True)
    import shutil

    shutil.copy(target, os.path.join(SCREENSHOTS, "case_report.png"))
