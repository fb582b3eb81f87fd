"""NIfTI load/save: voxel-exact round trips in every orientation, and agreement with SimpleITK."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg.errors import InputError
from napari_covidseg.io.nifti import OutputExistsError, check_same_grid, load_volume, save_volume

c, s = np.cos(0.3), np.sin(0.3)
AFFINES = {
    "RAS": np.diag([0.7, 0.8, 2.5, 1.0]),
    "LAS": np.diag([-0.7, 0.8, 2.5, 1.0]),
    "LPS": np.diag([-0.7, -0.8, 2.5, 1.0]),
    "permuted": np.array([[0, 0, 2.5, 10], [0.8, 0, 0, -5], [0, -0.7, 0, 3], [0, 0, 0, 1.0]]),
    # rotated 17 degrees about z (gantry-tilt-like), with an offset origin
    "oblique": np.array([[0.7 * c, -0.8 * s, 0, -120.5], [0.7 * s, 0.8 * c, 0, 80.25], [0, 0, 2.5, -300], [0, 0, 0, 1.0]]),
}
SHAPE = (9, 11, 7)  # file axes, deliberately all different


def _ct(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def _write(path, array, affine, sform_code=1, qform_code=1, slope=None, inter=None):
    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_round_trip_is_voxel_exact(tmp_path, orientation, suffix):
    affine = AFFINES[orientation]
    ct = _ct()
    src = _write(tmp_path / f"ct{suffix}", ct, affine, sform_code=2, qform_code=1)
    volume = load_volume(src)
    assert volume.kind == "image" and volume.data.dtype == np.int16
    assert volume.data.shape == volume.geometry.display_shape
    assert np.array_equal(volume.geometry.from_display(volume.data), ct)

    mask = (volume.data > 300).astype(np.uint8) + (volume.data > 1000).astype(np.uint8)
    out = save_volume(tmp_path / f"mask{suffix}", mask, volume.geometry)
    saved = nib.load(str(out))
    assert saved.shape == SHAPE
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert int(saved.header["sform_code"]) == 2 and int(saved.header["qform_code"]) == 1
    assert saved.get_data_dtype() == np.uint8
    stored = np.asanyarray(saved.dataobj)
    assert np.array_equal(stored, (ct > 300).astype(np.uint8) + (ct > 1000).astype(np.uint8))
    back = load_volume(out)
    assert back.kind == "labels" and np.array_equal(back.data, mask)

    # CT round trip too (image data, header copied from the source)
    out_ct = save_volume(tmp_path / f"ct_copy{suffix}", volume.data, volume.geometry)
    assert np.array_equal(np.asanyarray(nib.load(str(out_ct)).dataobj), ct)


def test_scaled_uint16_ct_becomes_int16_hu(tmp_path):
    ct = _ct()
    src = _write(tmp_path / "ct.nii.gz", (ct.astype(np.int32) + 1024).astype(np.uint16), AFFINES["LPS"], slope=1, inter=-1024)
    volume = load_volume(src)
    assert volume.data.dtype == np.int16
    assert np.array_equal(volume.geometry.from_display(volume.data), ct)


def test_fractional_scaling_gives_float32_hu(tmp_path):
    raw = np.random.default_rng(1).integers(0, 3000, size=SHAPE).astype(np.int16)
    src = _write(tmp_path / "ct.nii.gz", raw, AFFINES["RAS"], slope=0.5, inter=-1024)
    volume = load_volume(src)
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.geometry.from_display(volume.data), raw * 0.5 - 1024)


def test_mask_with_scaling_in_source_header_is_stored_verbatim(tmp_path):
    """A CT header with scl_slope/inter must not rescale the mask saved with it."""
    ct = _ct()
    src = _write(tmp_path / "ct.nii.gz", (ct.astype(np.int32) + 1024).astype(np.uint16), AFFINES["LAS"], slope=1, inter=-1024)
    volume = load_volume(src)
    mask = np.zeros(volume.data.shape, np.uint8)
    mask[2:4, 3:6, 1:3] = 2
    out = save_volume(tmp_path / "m.nii.gz", mask, volume.geometry)
    saved = nib.load(str(out))
    assert np.array_equal(np.asanyarray(saved.dataobj), volume.geometry.from_display(mask))
    assert saved.dataobj.slope in (1.0, None) and saved.dataobj.inter in (0.0, None)


def test_4d_with_trailing_singleton_is_squeezed(tmp_path):
    ct = _ct()
    src = _write(tmp_path / "ct4d.nii.gz", ct[..., None], AFFINES["RAS"])
    volume = load_volume(src)
    assert volume.data.ndim == 3
    assert np.array_equal(volume.geometry.from_display(volume.data), ct)


def test_label_detection(tmp_path):
    labels = np.zeros(SHAPE, np.int16)
    labels[1:5, 2:6, 2:4] = 1
    labels[5:8, 2:6, 2:4] = 2
    volume = load_volume(_write(tmp_path / "lungs.nii.gz", labels, AFFINES["RAS"]))
    assert volume.kind == "labels" and volume.data.dtype == np.uint8
    float_labels = labels.astype(np.float32)  # masks saved as float by some tools
    assert load_volume(_write(tmp_path / "lungs_f.nii.gz", float_labels, AFFINES["RAS"])).kind == "labels"
    with pytest.raises(InputError, match="not a mask"):
        load_volume(_write(tmp_path / "ct.nii.gz", _ct(), AFFINES["RAS"]), kind="labels")


def test_geometry_without_header_saves_a_valid_file(tmp_path):
    from napari_covidseg.io.geometry import Geometry

    geometry = Geometry.from_display_spacing((4, 5, 6), (2.5, 0.8, 0.7), origin_ras=(1.0, 2.0, 3.0))
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    out = save_volume(tmp_path / "m.nii", mask, geometry)
    back = load_volume(out)
    assert back.data.dtype == np.uint8 and np.array_equal(back.data, mask)
    np.testing.assert_allclose(back.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(back.geometry.affine, geometry.affine)


def test_save_never_overwrites_and_leaves_no_temp_files(tmp_path):
    volume = load_volume(_write(tmp_path / "ct.nii.gz", _ct(), AFFINES["LPS"]))
    target = tmp_path / "mask.nii.gz"
    save_volume(target, np.ones(volume.data.shape, np.uint8), volume.geometry)
    before = target.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        save_volume(target, np.zeros(volume.data.shape, np.uint8), volume.geometry)
    assert target.read_bytes() == before
    save_volume(target, np.zeros(volume.data.shape, np.uint8), volume.geometry, overwrite=True)
    assert not np.any(load_volume(target).data)
    with pytest.raises(InputError, match="shape"):
        save_volume(tmp_path / "wrong.nii.gz", np.zeros((2, 2, 2), np.uint8), volume.geometry)
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "mask.nii.gz"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills up half-way through the file: the partial temporary file (which exists, and holds
    bytes, when the error comes) is removed and the target never appears (nor is an old one touched)."""
    volume = load_volume(_write(tmp_path / "ct.nii.gz", _ct(), AFFINES["LPS"]))
    real_save = nib.save
    seen = []

    def crash_half_way(img, filename, *args, **kwargs):
        real_save(img, filename, *args, **kwargs)  # the whole file, then cut it: a write that ran out of space
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        seen.append((Path(filename).name, Path(filename).stat().st_size))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_volume(tmp_path / "mask.nii.gz", np.ones(volume.data.shape, np.uint8), volume.geometry)
    assert len(seen) == 1 and seen[0][0].startswith(".mask.nii.gz.") and seen[0][1] > 0  # the partial file existed
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]
    (tmp_path / "old.nii.gz").write_bytes(b"previous mask")
    with pytest.raises(OSError):
        save_volume(tmp_path / "old.nii.gz", np.ones(volume.data.shape, np.uint8), volume.geometry, overwrite=True)
    assert (tmp_path / "old.nii.gz").read_bytes() == b"previous mask"
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "old.nii.gz"]


def test_a_killed_save_leaves_a_part_file_that_the_next_save_removes(tmp_path):
    """A save killed outright (SIGKILL: no clean-up runs) leaves its .part file; the next save of the same
    target removes it once it is an hour old (a younger one may be another save still running)."""
    from napari_covidseg import atomic_file

    volume = load_volume(_write(tmp_path / "ct.nii.gz", _ct(), AFFINES["LPS"]))
    stale = tmp_path / ".mask.nii.gz.k1ll3d.part.nii.gz"
    fresh = tmp_path / ".mask.nii.gz.fr3sh0.part.nii.gz"
    other = tmp_path / ".other.nii.gz.k1ll3d.part.nii.gz"
    for leftover in (stale, fresh, other):
        leftover.write_bytes(b"half a file")
    old = os.stat(stale).st_mtime - atomic_file.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    save_volume(tmp_path / "mask.nii.gz", np.ones(volume.data.shape, np.uint8), volume.geometry)
    assert not stale.exists() and fresh.exists() and other.exists()
    assert np.all(load_volume(tmp_path / "mask.nii.gz").data == 1)


def test_mask_and_ct_grid_check(tmp_path):
    ct = load_volume(_write(tmp_path / "ct.nii.gz", _ct(), AFFINES["LPS"]))
    good = load_volume(_write(tmp_path / "m.nii.gz", np.zeros(SHAPE, np.uint8) + 1, AFFINES["LPS"]))
    check_same_grid(good, ct)
    small = load_volume(_write(tmp_path / "small.nii.gz", np.ones((4, 4, 4), np.uint8), AFFINES["LPS"]))
    with pytest.raises(InputError, match=r"small.nii.gz has shape .* do not belong together"):
        check_same_grid(small, ct)
    moved = AFFINES["LPS"].copy()
    moved[:3, 3] = (50, 0, 0)
    shifted = load_volume(_write(tmp_path / "moved.nii.gz", np.ones(SHAPE, np.uint8), moved))
    with pytest.raises(InputError, match="position/orientation"):
        check_same_grid(shifted, ct)


@pytest.mark.parametrize("orientation", ["LAS", "permuted", "oblique"])
def test_simpleitk_agrees_on_saved_mask_geometry(tmp_path, orientation):
    sitk = pytest.importorskip("SimpleITK")
    affine = AFFINES[orientation]
    src = _write(tmp_path / "ct.nii.gz", _ct(), affine)
    volume = load_volume(src)
    out = save_volume(tmp_path / "mask.nii.gz", (volume.data > 0).astype(np.uint8), volume.geometry)

    source_itk = sitk.ReadImage(str(src))
    mask_itk = sitk.ReadImage(str(out))
    # SimpleITK sees the saved mask exactly where it sees the source CT ...
    np.testing.assert_allclose(mask_itk.GetSpacing(), source_itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mask_itk.GetOrigin(), source_itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask_itk.GetDirection(), source_itk.GetDirection(), atol=1e-5)
    # ... and that is where nibabel's affine puts it (ITK is LPS: flip x and y of RAS)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(mask_itk.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(mask_itk.GetOrigin(), lps @ affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.array(mask_itk.GetDirection()).reshape(3, 3), lps @ (affine[:3, :3] / spacing), atol=1e-5)
    # and the voxels match (ITK array is (z, y, x) of the file axes)
    mask_file = np.asanyarray(nib.load(str(out)).dataobj)
    assert np.array_equal(sitk.GetArrayFromImage(mask_itk), np.transpose(mask_file, (2, 1, 0)))


@pytest.mark.parametrize("written_as, named", [(".nii", ".nii.gz"), (".nii.gz", ".nii")])
def test_misnamed_compression_is_read_anyway(tmp_path, written_as, named):
    """A .nii that is gzip-compressed (or a .nii.gz that is not) still holds a valid CT."""
    ct = _ct()
    real = _write(tmp_path / f"real{written_as}", ct, AFFINES["permuted"])
    misnamed = tmp_path / f"misnamed{named}"
    misnamed.write_bytes(real.read_bytes())
    volume = load_volume(misnamed)
    assert np.array_equal(volume.geometry.from_display(volume.data), ct)
    np.testing.assert_allclose(volume.geometry.affine, AFFINES["permuted"])
