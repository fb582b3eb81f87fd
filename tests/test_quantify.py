"""quantify(): volumes from spacing, patient sides, lesion counting, and the phantom's anatomy."""

import math

import numpy as np
import pytest

from napari_covidseg.errors import InputError
from napari_covidseg.quantify import MIN_LESION_ML, lung_score, quantify, severity_grade, split_left_right

SPACING = (2.0, 1.0, 0.5)  # one voxel = 1 mm^3 = 0.001 mL


def _two_lungs():
    """Patient's right lung (low x): 10*20*20 = 4000 voxels; left lung (high x): 10*20*10 = 2000."""
    lung = np.zeros((12, 30, 60), np.uint8)
    lung[1:11, 5:25, 5:25] = 1
    lung[1:11, 5:25, 40:50] = 2  # label values do not matter
    return lung


def test_volumes_and_sides():
    lung = _two_lungs()
    inf = np.zeros_like(lung)
    inf[2:4, 6:11, 6:11] = 1  # 50 voxels in the right lung
    inf[2:6, 10:15, 41:46] = 1  # 100 voxels in the left lung
    inf[5, 28, 30] = 1  # 1 voxel outside the lungs (below the lesion minimum volume), on the left side
    r = quantify(lung, inf, SPACING, min_lesion_ml=0.01)
    assert r["lung_ml"] == pytest.approx(6.0)
    assert r["right_lung_ml"] == pytest.approx(4.0)
    assert r["left_lung_ml"] == pytest.approx(2.0)
    assert r["right_infection_ml"] == pytest.approx(0.05)
    assert r["left_infection_ml"] == pytest.approx(0.101)  # the voxel outside the lung is on the left
    assert r["infection_ml"] == pytest.approx(0.151)
    assert r["infection_outside_lung_ml"] == pytest.approx(0.001)
    assert r["right_involvement_pct"] == pytest.approx(100 * 0.05 / 4.0)
    assert r["left_involvement_pct"] == pytest.approx(100 * 0.101 / 2.001)  # over lung | infection
    assert r["total_involvement_pct"] == pytest.approx(100 * 0.151 / 6.001)
    assert r["severity_grade"] == "CT-1" and r["left_lung_score"] == 2 and r["right_lung_score"] == 1
    assert r["n_lesions"] == 2  # the single outside voxel is 0.001 mL < 0.01 mL
    assert r["lesion_volumes_ml"] == pytest.approx([0.10, 0.05])
    assert r["lung_split_method"] == "components"


def test_voxel_volume_follows_spacing():
    lung = _two_lungs()
    inf = np.zeros_like(lung)
    inf[2:4, 6:11, 6:11] = 1
    a = quantify(lung, inf, (1.0, 1.0, 1.0))
    b = quantify(lung, inf, (5.0, 0.7, 0.7))
    assert b["lung_ml"] == pytest.approx(a["lung_ml"] * 5 * 0.49)
    assert b["infection_ml"] == pytest.approx(a["infection_ml"] * 5 * 0.49)
    assert b["total_involvement_pct"] == pytest.approx(a["total_involvement_pct"])


def test_lesions_26_connected_and_min_volume():
    lung = _two_lungs()
    inf = np.zeros_like(lung)
    inf[3, 8, 8] = inf[4, 9, 9] = 1  # diagonal neighbours: one lesion under 26-connectivity
    inf[3:6, 15:20, 15:20] = 1  # 75 voxels
    inf[8, 20, 45] = 1  # isolated voxel
    r = quantify(lung, inf, (1.0, 1.0, 1.0), min_lesion_ml=0.01)
    assert r["n_lesions"] == 1  # the 2-voxel and 1-voxel lesions are under 10 mm^3
    r = quantify(lung, inf, (10.0, 1.0, 1.0), min_lesion_ml=0.01)  # voxel = 10 mm^3: everything counts
    assert r["n_lesions"] == 3
    assert r["lesion_volumes_ml"] == pytest.approx([0.75, 0.02, 0.01])
    r = quantify(lung, inf, (1.0, 1.0, 1.0), min_lesion_ml=0.0)
    assert r["n_lesions"] == 3
    # the default threshold is the documented 0.1 mL: a one-voxel lesion of 120 mm^3 counts, one of 80 mm^3 does not
    single = np.zeros_like(lung)
    single[8, 20, 45] = 1
    assert quantify(lung, single, (120.0, 1.0, 1.0))["n_lesions"] == 1
    assert quantify(lung, single, (80.0, 1.0, 1.0))["n_lesions"] == 0
    assert quantify(lung, single, (80.0, 1.0, 1.0), min_lesion_ml=MIN_LESION_ML / 2)["n_lesions"] == 1
    r = quantify(lung, inf, (1.0, 1.0, 1.0))  # the default keeps lesions from 0.1 mL
    assert r["n_lesions"] == 0 and r["severity_grade"] == "CT-0" and r["lung_score_total"] == 0


def test_small_fragment_goes_to_its_side():
    lung = _two_lungs()
    lung[5, 27, 52] = 1  # a detached fragment beside the left lung (high x)
    left, right, method = split_left_right(lung)
    assert method == "components"
    assert left[5, 27, 52] and not right[5, 27, 52]
    assert left.sum() == 2001 and right.sum() == 4000


def test_touching_lungs_split_at_the_gap():
    lung = np.zeros((6, 20, 40), bool)
    lung[:, 2:18, 2:18] = True  # right lung, x 2..17
    lung[:, 2:18, 21:37] = True  # left lung, x 21..36
    lung[:, 2:4, 18:21] = True  # anterior junction: one connected component
    left, right, method = split_left_right(lung)
    assert method == "midline"
    assert right[:, :, :18].sum() == lung[:, :, :18].sum()
    assert left[:, :, 21:].sum() == lung[:, :, 21:].sum()
    assert (left & right).sum() == 0 and (left | right).sum() == lung.sum()


def test_single_lung_and_empty():
    lung = np.zeros((4, 10, 30), bool)
    lung[:, 2:8, 18:28] = True
    inf = np.zeros_like(lung)
    r = quantify(lung, inf, (1, 1, 1))
    assert r["lung_ml"] == pytest.approx(0.24)
    assert r["left_lung_ml"] + r["right_lung_ml"] == pytest.approx(0.24)
    empty = quantify(np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), (1, 1, 1))
    assert empty["lung_ml"] == 0.0 and empty["n_lesions"] == 0
    assert math.isnan(empty["total_involvement_pct"]) and math.isnan(empty["left_involvement_pct"])


def test_bad_input():
    with pytest.raises(InputError, match="same CT"):
        quantify(np.zeros((3, 4, 5)), np.zeros((3, 4, 6)), (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        quantify(np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), (1, 0, 1))
    with pytest.raises(InputError, match="3D"):
        quantify(np.zeros((4, 5)), np.zeros((4, 5)), (1, 1, 1))


def test_phantom_sides():
    from napari_covidseg.phantom import make_phantom

    ph = make_phantom(shape=(24, 128, 128), spacing=(10.0, 2.8, 2.8), seed=3)
    r = quantify(ph.lung, ph.infection, ph.spacing)
    left, right, method = split_left_right(ph.lung)
    assert method == "components"
    # the left lung is on the high-x side (display columns grow toward the patient's left)
    cols = np.arange(ph.lung.shape[2])
    assert (left.sum(axis=(0, 1)) * cols).sum() / left.sum() > ph.lung.shape[2] / 2
    assert (right.sum(axis=(0, 1)) * cols).sum() / right.sum() < ph.lung.shape[2] / 2
    # the right lung is the larger one (the heart takes room on the left)
    assert r["right_lung_ml"] > r["left_lung_ml"]
    assert 2000 < r["lung_ml"] < 8000
    assert r["infection_outside_lung_ml"] == 0.0
    assert r["n_lesions"] >= 1
    assert r["left_infection_ml"] + r["right_infection_ml"] == pytest.approx(r["infection_ml"])


def test_involvement_counts_infection_outside_the_lung_mask_and_grades():
    """A lung mask that leaves a consolidation out still shows it as involvement (lung | infection)."""
    lung = _two_lungs()
    inf = np.zeros_like(lung)
    inf[1:11, 5:25, 5:25] = 1  # the whole right lung
    inf[1:11, 5:25, 25:28] = 1  # and a consolidation just outside its mask (on the right)
    r = quantify(lung, inf, SPACING)
    right = 4000 + 600
    assert r["right_involvement_pct"] == pytest.approx(100.0)
    assert r["right_infection_ml"] == pytest.approx(right * 0.001)
    assert r["total_involvement_pct"] == pytest.approx(100 * right / (6000 + 600))
    assert r["severity_grade"] == "CT-3" and r["right_lung_score"] == 5 and r["left_lung_score"] == 0
    for pct, grade in ((0.5, "CT-1"), (25.0, "CT-1"), (25.1, "CT-2"), (50.0, "CT-2"), (74.9, "CT-3"), (75.0, "CT-4")):
        assert severity_grade(pct, 1) == grade
    assert [lung_score(p) for p in (0, 4.9, 5, 25, 26, 50, 51, 75, 76)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_ground_glass_and_consolidation_by_hu():
    lung = _two_lungs()
    inf = np.zeros_like(lung)
    inf[2:4, 6:11, 6:11] = 1  # 50 voxels
    ct = np.full(lung.shape, -850.0)
    ct[2, 6:11, 6:11] = -500.0  # 25 voxels of ground glass
    ct[3, 6:11, 6:11] = 20.0  # 25 voxels of consolidation
    r = quantify(lung, inf, SPACING, ct_hu=ct)
    assert r["ground_glass_ml"] == pytest.approx(0.025) and r["consolidation_ml"] == pytest.approx(0.025)
    assert "ground_glass_ml" not in quantify(lung, inf, SPACING)
