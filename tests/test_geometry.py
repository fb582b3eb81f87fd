import numpy as np
import pytest

from napari_covidseg.io import Geometry

AFFINES = {
    "ras_diag": np.diag([0.7, 0.7, 2.5, 1.0]),
    "las_diag": np.diag([-0.7, 0.7, 2.5, 1.0]),
    "lps_diag": np.diag([-0.7, -0.7, 2.5, 1.0]),
    "permuted": np.array([[0, 0, 2.5, 10], [0.8, 0, 0, -5], [0, -0.7, 0, 3], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_display_round_trip_is_exact(name):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, size=(30, 40, 50)).astype(np.int16)
    g = Geometry(AFFINES[name], arr.shape)
    disp = g.to_display(arr)
    assert disp.shape == g.display_shape
    assert np.array_equal(g.from_display(disp), arr)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_display_axes_point_left_posterior_superior(name):
    """Column index grows toward patient left, row toward posterior, slice toward superior."""
    aff = AFFINES[name]
    g = Geometry(aff, (30, 40, 50))
    # world coordinate (RAS+) of every voxel, in display order
    idx = np.indices((30, 40, 50)).reshape(3, -1)
    world = (aff[:3, :3] @ idx + aff[:3, 3:]).reshape(3, 30, 40, 50)
    wd = [g.to_display(world[i]) for i in range(3)]  # R, A, S coordinates per display voxel
    assert np.all(np.diff(wd[0], axis=2) < 0)  # x: toward -R, i.e. patient left
    assert np.all(np.diff(wd[1], axis=1) < 0)  # y: toward -A, i.e. posterior
    assert np.all(np.diff(wd[2], axis=0) > 0)  # z: toward superior


def test_spacing_follows_display_axes():
    g = Geometry(AFFINES["permuted"], (30, 40, 50))
    assert g.display_shape == (40, 30, 50)
    assert g.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_geometry_from_display_spacing_is_identity_orientation():
    g = Geometry.from_display_spacing((5, 6, 7), (2.5, 0.8, 0.7))
    arr = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    assert np.array_equal(g.to_display(g.from_display(arr)), arr)
    assert np.array_equal(g.to_display(np.transpose(arr)), arr)
    assert g.spacing == pytest.approx((2.5, 0.8, 0.7))
