"""Overlay labels, per-slice metrics, worst-slice ranking and the comparison CSV."""

import csv
import math

import numpy as np
import pytest

from napari_covidseg import metrics
from napari_covidseg.errors import InputError
from napari_covidseg.overlay import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    TRUE_POSITIVE,
    overlay_color_dict,
    overlay_labels,
    per_slice_metrics,
    rank_worst_slices,
    region_metrics,
    write_comparison_csv,
)


def _pair():
    """gt: a 4x4 square on slices 1-3; pred: shifted by one column on slice 1, missing on 2,
    exact on 3, plus a false blob on slice 4 (gt empty there); slice 0 empty in both."""
    gt = np.zeros((5, 10, 10), np.uint8)
    gt[1:4, 3:7, 3:7] = 2  # any non-zero is foreground
    pred = np.zeros_like(gt)
    pred[1, 3:7, 4:8] = 1
    pred[3, 3:7, 3:7] = 1
    pred[4, 0:2, 0:2] = 1
    return pred, gt


def test_overlay_values_are_tp_fn_fp():
    pred, gt = _pair()
    ov = overlay_labels(pred, gt)
    assert ov.dtype == np.uint8
    assert set(np.unique(ov)) == {0, TRUE_POSITIVE, FALSE_NEGATIVE, FALSE_POSITIVE}
    p, g = pred != 0, gt != 0
    assert np.array_equal(ov == TRUE_POSITIVE, p & g)
    assert np.array_equal(ov == FALSE_NEGATIVE, g & ~p)
    assert np.array_equal(ov == FALSE_POSITIVE, p & ~g)
    assert np.array_equal(ov == 0, ~p & ~g)
    # each class of the overlay is drawn in its documented colour: green TP, red FN (missed), yellow FP
    colour = {value: tuple(round(c * 255) for c in rgba) for value, rgba in overlay_color_dict().items()}
    assert colour[int(ov[p & g][0])] == (0, 255, 0, 255)
    assert colour[int(ov[g & ~p][0])] == (255, 0, 0, 255)
    assert colour[int(ov[p & ~g][0])] == (255, 255, 0, 255)
    assert colour[0][3] == 0 and len({TRUE_POSITIVE, FALSE_NEGATIVE, FALSE_POSITIVE, 0}) == 4


def test_overlay_colours_exact():
    colors = overlay_color_dict()
    assert np.allclose(np.array(colors[1]) * 255, (0, 255, 0, 255))
    assert np.allclose(np.array(colors[2]) * 255, (255, 0, 0, 255))
    assert np.allclose(np.array(colors[3]) * 255, (255, 255, 0, 255))
    assert colors[0][3] == 0 and colors[None][3] == 0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(InputError, match="shape"):
        overlay_labels(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


def test_region_metrics_match_metrics_module():
    pred, gt = _pair()
    spacing = (2.5, 0.7, 0.8)
    got = region_metrics(pred, gt, spacing)
    p, g = pred != 0, gt != 0
    assert got["dice"] == pytest.approx(metrics.dice(p, g))
    assert got["iou"] == pytest.approx(metrics.iou(p, g))
    assert got["sensitivity"] == pytest.approx(metrics.sensitivity(p, g))
    assert got["specificity"] == pytest.approx(metrics.specificity(p, g))
    assert got["precision"] == pytest.approx(metrics.precision(p, g))
    assert got["hd95_mm"] == pytest.approx(metrics.hd95(p, g, spacing))
    # Hand check of Dice: |P|=16+16+4, |G|=48, TP=12+16
    assert got["dice"] == pytest.approx(2 * 28 / (36 + 48))


def test_region_metrics_empty_both_is_nan():
    z = np.zeros((4, 4), bool)
    got = region_metrics(z, z, (1.0, 1.0))
    assert all(math.isnan(v) for v in got.values())


def test_per_slice_metrics():
    pred, gt = _pair()
    spacing = (2.0, 0.5, 0.5)
    per = per_slice_metrics(pred, gt, spacing, with_hd95=True)
    expected_dice = metrics.per_slice_dice(pred != 0, gt != 0)
    np.testing.assert_allclose(per["dice"], expected_dice, equal_nan=True)
    assert math.isnan(per["dice"][0])
    assert per["dice"][1] == pytest.approx(2 * 12 / 32)
    assert per["dice"][2] == 0.0 and per["dice"][3] == 1.0 and per["dice"][4] == 0.0
    assert per["hd95_mm"][1] == pytest.approx(metrics.hd95(pred[1] != 0, gt[1] != 0, (0.5, 0.5)))
    assert math.isnan(per["hd95_mm"][2])  # prediction empty: no distance
    assert list(per["gt_voxels"]) == [0, 16, 16, 16, 0]
    assert list(per["pred_voxels"]) == [0, 16, 0, 16, 4]


def test_rank_worst_slices_skips_empty_and_keeps_ties_in_order():
    dice = np.array([np.nan, 0.75, 0.0, 1.0, 0.0, np.nan, 0.5])
    assert list(rank_worst_slices(dice)) == [2, 4, 6, 1, 3]
    assert list(rank_worst_slices(np.array([np.nan, np.nan]))) == []


def test_comparison_csv(tmp_path):
    pred, gt = _pair()
    spacing = (2.0, 0.5, 0.5)
    per = per_slice_metrics(pred, gt, spacing, with_hd95=True)
    volume = region_metrics(pred, gt, spacing)
    path = write_comparison_csv(tmp_path / "m.csv", per, volume)
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["slice", "dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "gt_voxels", "pred_voxels"]
    assert len(rows) == 1 + 5 + 1
    assert rows[1][0] == "0" and rows[1][1] == ""  # empty slice: undefined
    assert float(rows[2][1]) == pytest.approx(per["dice"][1])
    assert rows[-1][0] == "volume"
    assert float(rows[-1][1]) == pytest.approx(volume["dice"])
    assert float(rows[-1][6]) == pytest.approx(volume["hd95_mm"])
    assert rows[-1][7:] == ["48", "36"]
    before = path.read_text()
    with pytest.raises(InputError, match="exists"):
        write_comparison_csv(path, per, volume)
    assert path.read_text() == before
    write_comparison_csv(path, per, volume, overwrite=True)
