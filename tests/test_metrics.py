"""Metrics against independent brute-force references, hand-computed cases and empty masks."""

import math
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from napari_covidseg import metrics
from napari_covidseg.errors import InputError


# --- independent references ---------------------------------------------------------------------
def _ref_counts(pred, gt):
    """Counts from Python sets of voxel coordinates (no vectorised boolean algebra)."""
    p = set(map(tuple, np.argwhere(pred)))
    g = set(map(tuple, np.argwhere(gt)))
    tp = len(p & g)
    fp = len(p - g)
    fn = len(g - p)
    tn = int(np.prod(pred.shape)) - len(p | g)
    return tp, fp, fn, tn


def _ref_surface_points(mask):
    """Foreground voxels with a face neighbour outside the mask or outside the image (explicit loop)."""
    pts = []
    shape = mask.shape
    for idx in np.argwhere(mask):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                nb = idx.copy()
                nb[axis] += step
                if nb[axis] < 0 or nb[axis] >= shape[axis] or not mask[tuple(nb)]:
                    pts.append(idx)
                    break
            else:
                continue
            break
    return np.array(pts, dtype=float)


def _ref_hd95(pred, gt, spacing):
    sp = np.asarray(spacing, dtype=float)
    a = _ref_surface_points(pred) * sp
    b = _ref_surface_points(gt) * sp
    d = cdist(a, b)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def _random_mask(rng, shape, fill):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return noise > np.quantile(noise, 1 - fill)


CASES = [
    ((40, 50), (0.7, 1.3)),
    ((12, 20, 24), (5.0, 1.4, 0.9)),
    ((9, 16, 16), (2.5, 0.6, 0.6)),
]


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_reference(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred = _random_mask(rng, shape, rng.uniform(0.1, 0.4))
    gt = _random_mask(rng, shape, rng.uniform(0.1, 0.4))
    tp, fp, fn, tn = _ref_counts(pred, gt)
    assert metrics.confusion(pred, gt) == (tp, fp, fn, tn)
    assert metrics.dice(pred, gt) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics.iou(pred, gt) == pytest.approx(tp / (tp + fp + fn))
    assert metrics.sensitivity(pred, gt) == pytest.approx(tp / (tp + fn))
    assert metrics.specificity(pred, gt) == pytest.approx(tn / (tn + fp))
    assert metrics.precision(pred, gt) == pytest.approx(tp / (tp + fp))
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    assert metrics.f_measure(pred, gt) == pytest.approx(2 * prec * rec / (prec + rec))
    assert metrics.f_measure(pred, gt, beta=2) == pytest.approx(5 * prec * rec / (4 * prec + rec))
    assert metrics.hd95(pred, gt, spacing) == pytest.approx(_ref_hd95(pred, gt, spacing), rel=1e-9, abs=1e-9)
    # integer label inputs (any non-zero is foreground) give the same numbers
    assert metrics.dice(pred.astype(np.uint8) * 2, gt.astype(np.int32)) == pytest.approx(metrics.dice(pred, gt))
    assert metrics.hd95(pred.astype(np.uint8) * 3, gt.astype(np.int16), spacing) == pytest.approx(metrics.hd95(pred, gt, spacing))


def test_hd95_small_objects_far_from_image_border():
    """Cropping to the bounding box must not change anything (masks in a large empty image)."""
    rng = np.random.default_rng(5)
    big_p = np.zeros((30, 60, 60), bool)
    big_g = np.zeros((30, 60, 60), bool)
    big_p[10:18, 20:34, 22:40] = _random_mask(rng, (8, 14, 18), 0.5)
    big_g[12:20, 25:37, 20:35] = _random_mask(rng, (8, 12, 15), 0.5)
    spacing = (3.0, 0.8, 1.1)
    assert metrics.hd95(big_p, big_g, spacing) == pytest.approx(_ref_hd95(big_p, big_g, spacing))


def test_hand_computed_2d():
    gt = np.zeros((5, 6), bool)
    gt[1:3, 1:4] = True  # 6 voxels
    pred = np.zeros((5, 6), bool)
    pred[1:3, 2:5] = True  # 6 voxels, 4 shared
    assert metrics.confusion(pred, gt) == (4, 2, 2, 22)
    assert metrics.dice(pred, gt) == pytest.approx(8 / 12)
    assert metrics.iou(pred, gt) == pytest.approx(4 / 8)
    assert metrics.sensitivity(pred, gt) == pytest.approx(4 / 6)
    assert metrics.precision(pred, gt) == pytest.approx(4 / 6)
    assert metrics.specificity(pred, gt) == pytest.approx(22 / 24)
    # Every voxel of these thin masks is surface; shift by one column.
    # pred->gt distances: cols 2,3 -> 0, col 4 -> 1 column; gt->pred: col 1 -> 1 column, else 0.
    # pooled: eight 0s and four 1s (times the x spacing 2 mm) -> 95th percentile = 2.0 mm
    assert metrics.hd95(pred, gt, (0.5, 2.0)) == pytest.approx(2.0)
    assert metrics.mae(pred, gt) == pytest.approx(4 / 30)


def test_hand_computed_hd95_translated_cube():
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True
    pred = np.roll(gt, 3, axis=0)  # 3 slices along z at 2.5 mm
    # a shift along the coarse axis: the reference sees it in mm (3 slices x 2.5 mm between faces)
    assert metrics.hd95(pred, gt, (2.5, 1.0, 1.0)) == pytest.approx(_ref_hd95(pred, gt, (2.5, 1.0, 1.0)))
    assert metrics.hd95(gt, gt, (2.5, 1.0, 1.0)) == 0.0
    single = np.zeros((10, 10, 10), bool)
    single[1, 1, 1] = True
    other = np.zeros((10, 10, 10), bool)
    other[1, 5, 4] = True
    assert metrics.hd95(single, other, (1.0, 2.0, 3.0)) == pytest.approx(math.hypot(8.0, 9.0))


def test_empty_mask_conventions():
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1, 2, 3] = True
    full = np.ones((4, 5, 6), bool)
    # both empty: a perfect (trivial) result
    for fn in (metrics.dice, metrics.iou, metrics.sensitivity, metrics.precision, metrics.f_measure, metrics.specificity):
        assert fn(empty, empty) == 1.0
    assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
    # ground truth empty, prediction not
    assert metrics.dice(some, empty) == 0.0
    assert metrics.iou(some, empty) == 0.0
    assert metrics.precision(some, empty) == 0.0
    assert metrics.sensitivity(some, empty) == 1.0
    assert math.isnan(metrics.hd95(some, empty, (1, 1, 1)))
    # prediction empty, ground truth not
    assert metrics.dice(empty, some) == 0.0
    assert metrics.sensitivity(empty, some) == 0.0
    assert metrics.precision(empty, some) == 1.0
    assert math.isnan(metrics.hd95(empty, some, (1, 1, 1)))
    # no negatives
    assert metrics.specificity(full, full) == 1.0
    assert metrics.specificity(empty, full) == 1.0
    res = metrics.all_metrics(empty, empty, spacing=(1, 1, 1))
    assert res["dice"] == res["iou"] == res["sensitivity"] == res["precision"] == 1.0
    assert res["hd95_mm"] == 0.0 and res["mae"] == 0.0


def test_all_metrics_keys_and_values():
    rng = np.random.default_rng(3)
    gt = _random_mask(rng, (8, 30, 30), 0.3)
    prob = np.clip(gt * 0.8 + rng.uniform(0, 0.3, gt.shape), 0, 1)
    pred = prob > 0.5
    res = metrics.all_metrics(pred, gt, spacing=(4.0, 1.0, 1.0), prob=prob)
    assert tuple(res) == metrics.METRIC_KEYS
    assert all(isinstance(v, float) for v in res.values())
    assert res["dice"] == pytest.approx(metrics.dice(pred, gt))
    assert res["f_measure"] == pytest.approx(res["dice"])
    assert res["hd95_mm"] == pytest.approx(metrics.hd95(pred, gt, (4.0, 1.0, 1.0)))
    assert res["mae"] == pytest.approx(np.mean(np.abs(prob - gt)))
    # without prob the MAE is the fraction of wrong voxels
    res2 = metrics.all_metrics(pred, gt)
    assert res2["mae"] == pytest.approx(np.mean(pred != gt))


def test_per_slice_dice_and_metrics():
    pred = np.zeros((4, 6, 6), bool)
    gt = np.zeros((4, 6, 6), bool)
    gt[0, :2, :2] = True
    pred[0, :2, :3] = True  # dice 8/10
    pred[2, 1, 1] = True  # only pred: dice 0
    gt[3, 2:4, 2:4] = True  # only gt: dice 0; slice 1 empty in both -> NaN
    d = metrics.per_slice_dice(pred, gt)
    np.testing.assert_allclose(d, [0.8, np.nan, 0.0, 0.0], equal_nan=True)
    per = metrics.per_slice_metrics(pred, gt)
    np.testing.assert_allclose(per["dice"], d, equal_nan=True)
    for z in (0, 2, 3):
        assert per["iou"][z] == pytest.approx(metrics.iou(pred[z], gt[z]))
        assert per["sensitivity"][z] == pytest.approx(metrics.sensitivity(pred[z], gt[z]))
        assert per["specificity"][z] == pytest.approx(metrics.specificity(pred[z], gt[z]))
        assert per["precision"][z] == pytest.approx(metrics.precision(pred[z], gt[z]))
    assert np.isnan(per["iou"][1])
    assert per["gt_voxels"].tolist() == [4, 0, 0, 4]
    assert per["pred_voxels"].tolist() == [6, 0, 1, 0]


def test_bad_input_messages():
    with pytest.raises(InputError, match="same"):
        metrics.dice(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(InputError, match="spacing"):
        metrics.hd95(np.ones((3, 4), bool), np.ones((3, 4), bool), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        metrics.hd95(np.ones((3, 4), bool), np.ones((3, 4), bool), (1.0, -1.0))


def test_speed_on_full_size_volume():
    rng = np.random.default_rng(0)
    shape = (48, 256, 256)
    gt = np.zeros(shape, bool)
    gt[10:40, 60:200, 40:120] = True
    gt[10:40, 60:200, 140:220] = True
    pred = np.roll(gt, 2, axis=2)
    pred[20, 100, 100] = True
    prob = rng.random(shape, dtype=np.float32)
    t0 = time.perf_counter()
    metrics.all_metrics(pred, gt, spacing=(5.0, 1.4, 1.4), prob=prob, with_hd95=False)
    metrics.per_slice_dice(pred, gt)
    ratios_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    value = metrics.hd95(pred, gt, (5.0, 1.4, 1.4))
    hd_s = time.perf_counter() - t0
    assert value > 0
    # generous bounds: the CI machine is shared (figures measured alone: ~0.1 s and ~1 s)
    assert ratios_s < 1.0, ratios_s
    assert hd_s < 6.0, hd_s


# --- the k-d tree HD95 gives the distance-transform values ---------------------------------------
def _edt_surface_distances(pred, gt, spacing):
    """The former implementation: surfaces by binary erosion, distances by a dense EDT."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    sp_ = pred & ~ndimage.binary_erosion(pred, structure=structure, border_value=0)
    sg_ = gt & ~ndimage.binary_erosion(gt, structure=structure, border_value=0)
    return (ndimage.distance_transform_edt(~sg_, sampling=spacing)[sp_],
            ndimage.distance_transform_edt(~sp_, sampling=spacing)[sg_])


@pytest.mark.parametrize("shape,spacing", [((60, 70), (0.7, 1.3)), ((24, 48, 40), (2.5, 0.8, 0.8)),
                                           ((16, 30, 30), (1.0, 1.0, 1.0))])
def test_kd_tree_distances_equal_the_distance_transform(shape, spacing):
    rng = np.random.default_rng(7)
    for _ in range(3):
        pred = _random_mask(rng, shape, rng.uniform(0.1, 0.5))
        gt = pred.copy() if rng.random() < 0.3 else _random_mask(rng, shape, rng.uniform(0.1, 0.5))
        gt[tuple(rng.integers(0, s) for s in shape)] ^= True  # shared surfaces plus a change
        structure = ndimage.generate_binary_structure(pred.ndim, 1)
        assert np.array_equal(metrics._surface(pred), pred & ~ndimage.binary_erosion(pred, structure, border_value=0))
        got = metrics.surface_distances(pred, gt, spacing)
        expected = _edt_surface_distances(pred, gt, spacing)
        for a, b in zip(got, expected):  # same voxels in the same order, same distances
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        assert metrics.hd95(pred, gt, spacing) == pytest.approx(
            float(np.percentile(np.concatenate(expected), 95)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.5, 0.7, 0.7), (1.0, 1.0, 1.0), (0.6, 2.0, 0.9)])
def test_offset_lookup_and_k_d_tree_together_give_the_distance_transform(spacing, monkeypatch):
    """Surfaces 0 to 8 voxels apart, so some voxels are resolved by the offset lookup and the others
    by the k-d tree (both paths are checked to run), all equal to the dense EDT."""
    z, y, x = np.ogrid[:20, :40, :40]
    gt = ((z - 10) / 7.0) ** 2 + ((y - 20) / 14.0) ** 2 + ((x - 18) / 12.0) ** 2 < 1
    pred = np.roll(gt, 1, axis=1) | ((z > 5) & (z < 8) & (y > 30) & (x > 33))  # shifted, plus a far blob
    paths = []
    real_tree = metrics.cKDTree
    monkeypatch.setattr(metrics, "cKDTree", lambda *a, **k: paths.append("tree") or real_tree(*a, **k))
    got = metrics.surface_distances(pred, gt, spacing)
    expected = _edt_surface_distances(pred, gt, spacing)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert "tree" in paths and 0 < np.count_nonzero((got[0] > 0) & (got[0] <= 3 * min(spacing))) < len(got[0])
    offsets, lengths = metrics._local_offsets(spacing)
    assert np.all(np.diff(lengths) >= 0) and lengths[-1] <= 3 * min(spacing) + 1e-9
    # every offset no longer than the last kept one is kept (the first hit is the nearest)
    grid = np.stack(np.meshgrid(*[np.arange(-5, 6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    all_lengths = np.sqrt(((grid * np.asarray(spacing)) ** 2).sum(axis=1))
    assert np.count_nonzero((all_lengths > 0) & (all_lengths <= lengths[-1] + 1e-9)) == len(lengths)


def test_ratios_come_from_one_count(monkeypatch):
    from napari_covidseg.overlay import compare_masks, region_metrics

    rng = np.random.default_rng(3)
    pred, gt = _random_mask(rng, (6, 20, 20), 0.3), _random_mask(rng, (6, 20, 20), 0.3)
    expected = {"dice": metrics.dice(pred, gt), "iou": metrics.iou(pred, gt), "sensitivity": metrics.sensitivity(pred, gt),
                "specificity": metrics.specificity(pred, gt), "precision": metrics.precision(pred, gt)}
    calls = []
    real = metrics.confusion
    monkeypatch.setattr(metrics, "confusion", lambda p, g: calls.append(1) or real(p, g))
    values = region_metrics(pred, gt, (1.0, 1.0, 1.0), with_hd95=False)
    assert len(calls) == 1 and values == pytest.approx(expected)
    comparison = compare_masks(pred, gt)
    assert comparison.volume_counts() == real(pred, gt)
    np.testing.assert_array_equal(comparison.counts, np.array([real(pred[z], gt[z]) for z in range(6)]))
    np.testing.assert_allclose(comparison.slice_dice(), metrics.per_slice_dice(pred, gt), equal_nan=True)
    assert comparison.volume_metrics() == pytest.approx(values)
