"""8-bit slice images (PNG, JPEG, TIFF; one file, a multi-page TIFF or a folder of numbered slices)
open as an 8-bit display volume with unknown spacing; masks of them save as NIfTI on their grid."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from napari_covidseg.errors import InputError
from napari_covidseg.intensity import DISPLAY8
from napari_covidseg.io import loader
from napari_covidseg.io.nifti import load_volume
from napari_covidseg.io.volume import check_same_grid

iio = pytest.importorskip("imageio.v3")

DSTAROFF_CASE = ("covid19ctseg_dstaroff", "images")


def _slices(shape=(5, 40, 48), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape).astype(np.uint8)


def _write_numbered(folder: Path, stack, pattern="ct_{}.png", start=1):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(stack):
        iio.imwrite(folder / pattern.format(k + start), image)
    return folder


def test_real_8bit_slices_open_like_their_nifti(shared_data_dir, tmp_path):
    folder = Path(shared_data_dir, *DSTAROFF_CASE)
    reference = load_volume(sorted(folder.glob("*.nii.gz"))[0])
    _write_numbered(tmp_path / "pngs", reference.data, pattern="slice{}.png", start=0)
    volume = loader.load_any(tmp_path / "pngs")
    assert volume.kind == "image" and volume.domain == DISPLAY8 and not volume.spacing_known
    assert volume.source_format == "slices"
    np.testing.assert_array_equal(volume.data, reference.data)
    assert reference.domain == DISPLAY8 and not reference.spacing_known


def test_numbered_slices_are_ordered_by_number_not_name(tmp_path):
    stack = _slices((12, 20, 30))
    _write_numbered(tmp_path / "ct", stack)  # ct_1 .. ct_12: "ct_10" sorts before "ct_2" by name
    volume = loader.load_any(tmp_path / "ct")
    np.testing.assert_array_equal(volume.data, stack)
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.notes == []


def test_single_files_multipage_tiff_grey_rgb_and_jpeg(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    stack = _slices((6, 20, 30))
    iio.imwrite(tmp_path / "one.png", stack[0])
    iio.imwrite(tmp_path / "grey_rgb.png", np.repeat(stack[0][..., None], 3, axis=-1))
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    iio.imwrite(tmp_path / "slice.jpg", stack[1], quality=95)
    np.testing.assert_array_equal(loader.load_any(tmp_path / "one.png").data, stack[:1])
    np.testing.assert_array_equal(loader.load_any(tmp_path / "grey_rgb.png").data, stack[:1])
    np.testing.assert_array_equal(loader.load_any(tmp_path / "stack.tif").data, stack)
    jpeg = loader.load_any(tmp_path / "slice.jpg")
    assert jpeg.data.shape == (1, 20, 30) and jpeg.domain == DISPLAY8
    assert np.abs(jpeg.data.astype(int) - stack[1]).mean() < 20  # lossy, but the same picture


def test_png_mask_becomes_labels_and_a_mask_saved_for_png_slices_is_nifti_on_their_grid(tmp_path):
    stack = _slices((6, 20, 30))
    ct = loader.load_any(_write_numbered(tmp_path / "ct", stack))
    painted = np.zeros(stack.shape, np.uint8)
    painted[:, 5:15, 8:20] = 255
    mask_folder = _write_numbered(tmp_path / "lung", painted)
    mask = loader.load_any(mask_folder)
    assert mask.kind == "labels"
    check_same_grid(mask, ct)
    suffix = loader.mask_suffix(ct.source_path)
    assert suffix == ".nii.gz"
    saved = loader.save_any(tmp_path / f"ct_lung{suffix}", (painted > 0).astype(np.uint8), ct.geometry)
    back = loader.load_any(saved)
    np.testing.assert_array_equal(back.data, painted > 0)
    check_same_grid(back, ct)


def test_zip_of_slices_opens(tmp_path):
    stack = _slices((3, 16, 16))
    folder = _write_numbered(tmp_path / "ct", stack)
    with zipfile.ZipFile(tmp_path / "ct.zip", "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"case/{path.name}")
    volume = loader.load_any(tmp_path / "ct.zip")
    np.testing.assert_array_equal(volume.data, stack)
    assert volume.source_path == str((tmp_path / "ct.zip").resolve())


def test_gaps_are_reported_and_bad_folders_refused(tmp_path):
    stack = _slices((3, 16, 16))
    gap = _write_numbered(tmp_path / "gap", stack)
    os.rename(gap / "ct_3.png", gap / "ct_7.png")
    assert "slice numbers 3, 4, 5, 6 are missing" in loader.load_any(gap).notes[0]

    mixed = _write_numbered(tmp_path / "mixed", stack)
    iio.imwrite(mixed / "mask_1.png", stack[0])
    twice = _write_numbered(tmp_path / "twice", stack)
    iio.imwrite(twice / "ct_01.png", stack[0])
    sizes = _write_numbered(tmp_path / "sizes", stack)
    iio.imwrite(sizes / "ct_4.png", stack[0][:8])
    colour = tmp_path / "colour.png"
    rgb = np.stack([stack[0], stack[1], stack[2]], axis=-1)
    iio.imwrite(colour, rgb)
    sixteen = tmp_path / "sixteen.png"
    iio.imwrite(sixteen, (np.arange(16 * 16).reshape(16, 16) * 100).astype(np.uint16))
    for path, words in ((mixed, "mixes several image series"), (twice, "same slice number 1"),
                        (sizes, "same size"), (colour, "colour image"), (sixteen, "not 8-bit")):
        with pytest.raises(InputError, match=words):
            loader.load_any(path)
