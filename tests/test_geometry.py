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


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
@pytest.mark.parametrize("flips", [(), (0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0, 1, 2)])
def test_contiguous_in_place_equals_a_contiguous_copy(perm, flips):
    from napari_covidseg.io.volume import contiguous_in_place

    for shape in [(5, 6, 7), (4, 3, 2), (1, 1, 1)]:
        base = np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)
        view = np.flip(base.transpose(perm), flips) if flips else base.transpose(perm)
        expected = np.ascontiguousarray(view)
        got = contiguous_in_place(view)
        assert got.flags.c_contiguous and got.dtype == np.int16
        np.testing.assert_array_equal(got, expected)


def test_a_ct_that_needs_flipping_is_read_without_a_second_copy(tmp_path):
    """The usual NIfTI CT (x fastest, RAS axes) becomes the (z, y, x) LPS display array in its own
    memory: reading it needs about one CT of memory, not two (issue 13's memory bound)."""
    import tracemalloc

    import nibabel as nib

    from napari_covidseg.io.loader import load_any

    file_array = np.random.default_rng(0).integers(-1024, 400, size=(128, 96, 60), dtype=np.int16)
    nib.save(nib.Nifti1Image(file_array, np.diag([0.8, 0.8, 2.0, 1.0])), str(tmp_path / "ct.nii"))
    tracemalloc.start()
    try:
        volume = load_any(tmp_path / "ct.nii")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # RAS on disk -> LPS display: x and y flipped, axes reversed
    np.testing.assert_array_equal(volume.data, file_array[::-1, ::-1, :].transpose(2, 1, 0))
    assert volume.data.flags.c_contiguous
    assert peak < 1.3 * file_array.nbytes, (peak, file_array.nbytes)
