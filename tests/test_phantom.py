"""The synthetic chest CT: HU of each tissue, ground truth consistency, anatomy sides, seeds, speed."""

import time

import numpy as np
import pytest
from scipy import ndimage

from napari_covidseg.io.geometry import Geometry
from napari_covidseg.phantom import LESION_CONSOLIDATION, LESION_GGO, make_phantom

SMALL = dict(shape=(24, 128, 128), spacing=(10.0, 2.8, 2.8))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, **SMALL)


def test_types_and_geometry(phantom):
    ph = phantom
    assert ph.ct.dtype == np.int16 and ph.lung.dtype == np.uint8 and ph.infection.dtype == np.uint8
    assert ph.ct.shape == ph.lung.shape == ph.infection.shape == (24, 128, 128)
    assert set(np.unique(ph.lung)) <= {0, 1} and set(np.unique(ph.infection)) <= {0, 1}
    assert isinstance(ph.geometry, Geometry)
    assert ph.geometry.spacing == pytest.approx((10.0, 2.8, 2.8))
    assert ph.geometry.display_shape == (24, 128, 128)
    assert ph.spacing == (10.0, 2.8, 2.8) and ph.seed == 0


def test_hounsfield_units(phantom):
    ph = phantom
    ct = ph.ct.astype(float)
    lung = ph.lung.astype(bool)
    inf = ph.infection.astype(bool)
    assert -900 < ct[lung & ~inf].mean() < -790
    ggo = ph.lesion_type == LESION_GGO
    cons = ph.lesion_type == LESION_CONSOLIDATION
    assert ggo.any() and cons.any(), "seed 0 has both lesion types"
    assert -700 < ct[ggo].mean() < -300
    assert -100 < ct[cons].mean() < 50
    assert ((ph.lesion_type > 0) == inf).all()
    # air: the top rows of the image are outside the patient
    assert abs(ct[:, :5].mean() + 1000) < 15
    # bone: the vertebral body below the middle of the image (posterior), bright
    assert (ct > 300).sum() > 0.002 * ct.size
    bone_rows = np.nonzero(ct > 300)[1]
    assert np.median(bone_rows) > 0.5 * ct.shape[1]
    assert np.percentile(ct[ct > 300], 90) > 600  # cortical bone
    # soft tissue: the body holds a lot of voxels around +40 HU
    assert ((ct > 0) & (ct < 100)).mean() > 0.05
    # noise: HU spread inside a big uniform region (outside the patient) is ~15-25 HU
    assert 12 < ct[:, :5, :].std() < 28


def test_masks_consistent(phantom):
    lung = phantom.lung.astype(bool)
    inf = phantom.infection.astype(bool)
    assert inf.any()
    assert not (inf & ~lung).any(), "infection must lie inside the lungs"
    assert 0.04 < lung.mean() < 0.3
    assert 0.005 < inf.sum() / lung.sum() < 0.25
    # two lungs: the two largest components are comparable
    labels, n = ndimage.label(lung, structure=np.ones((3, 3, 3)))
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
    assert n >= 2 and sizes[1] > 0.5 * sizes[0]


def test_anatomy_sides_and_levels(phantom):
    lung = phantom.lung.astype(bool)
    nz, ny, nx = lung.shape
    right = lung[..., : nx // 2].sum()  # patient's right: low x (image left)
    left = lung[..., nx // 2 :].sum()
    assert right > left, "the right lung is the larger one (heart on the left)"
    # lungs grow from the apex (top slices) toward the base
    per_slice = lung.sum(axis=(1, 2))
    assert per_slice[-1] < 0.6 * per_slice.max()
    assert int(np.argmax(per_slice)) < nz * 0.7
    # lesions mostly in the periphery: in-plane closer to the lung border than lung voxels on
    # average (the huge z sampling makes the distance transform in-plane)
    depth = ndimage.distance_transform_edt(lung, sampling=(1e4,) + phantom.spacing[1:])
    inf = phantom.infection.astype(bool)
    assert depth[inf].mean() < 0.95 * depth[lung].mean()
    # the table is at the bottom of the image (posterior): bright shell rows below the body
    ct = phantom.ct
    mid = ct[nz // 2]
    table_rows = np.nonzero((mid[:, nx // 2 + 8 : nx // 2 + 20] > 100).all(axis=1))[0]
    assert table_rows.size and table_rows.max() > 0.75 * ny


def test_deterministic_and_seeded():
    a = make_phantom(seed=4, **SMALL)
    b = make_phantom(seed=4, **SMALL)
    c = make_phantom(seed=5, **SMALL)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.lung, b.lung)
    np.testing.assert_array_equal(a.infection, b.infection)
    assert not np.array_equal(a.infection, c.infection)
    assert not np.array_equal(a.lung, c.lung)


def test_options():
    healthy = make_phantom(seed=2, healthy=True, **SMALL)
    assert not healthy.infection.any() and healthy.lung.any()
    assert not (healthy.lesion_type > 0).any()
    for fraction in (0.03, 0.25):
        ph = make_phantom(seed=2, infection_fraction=fraction, **SMALL)
        assert ph.infection.sum() / ph.lung.sum() == pytest.approx(fraction, abs=0.01)
    one = make_phantom(seed=2, n_lesions=1, **SMALL)
    _, n = ndimage.label(one.infection, structure=np.ones((3, 3, 3)))
    assert one.n_lesions == 1 and 1 <= n <= 2  # one lesion (a border crumb at most)
    clean = make_phantom(seed=2, noise_hu=0, **SMALL)
    assert clean.ct[:, :5].std() < 1


@pytest.mark.parametrize("shape", [(16, 128, 128), (8, 64, 96), (40, 200, 180)])
def test_any_shape(shape):
    ph = make_phantom(shape=shape, spacing=(5.0, 1.4, 1.4), seed=1)
    assert ph.ct.shape == shape
    assert ph.lung.any() and ph.infection.any()
    assert not (ph.infection.astype(bool) & ~ph.lung.astype(bool)).any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape=(10, 20))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(shape=(8, 32, 32), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="infection_fraction"):
        make_phantom(shape=(8, 32, 32), infection_fraction=1.5)


def test_default_size_is_fast():
    make_phantom(shape=(8, 64, 64))  # warm up imports and caches
    seconds = []
    for seed in (0, 1):  # CPU time of the faster of two runs: robust on a shared machine
        t0 = time.process_time()
        ph = make_phantom(seed=seed)
        seconds.append(time.process_time() - t0)
    assert ph.ct.shape == (48, 256, 256)
    # ~0.5 s measured on an idle core
    assert min(seconds) < 2.0, seconds
