"""NRRD and MetaImage open through the one loader with the geometry of the NIfTI of the same image,
in several orientations, and masks saved for them round-trip in the CT's own format on its grid."""

import os

import numpy as np
import pytest

from io_helpers import cip_paths, rotation, with_direction
from napari_covidseg.errors import InputError
from napari_covidseg.io import loader
from napari_covidseg.io.nifti import load_volume
from napari_covidseg.io.output import OutputExistsError
from napari_covidseg.io.volume import check_same_grid

sitk = pytest.importorskip("SimpleITK")

DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LAI": np.diag([1.0, -1.0, -1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]),  # slices stacked front to back
    "oblique": rotation((1.0, 0.4, 0.2), 21.0),
}
SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


@pytest.fixture
def cip_image(shared_data_dir):
    return sitk.ReadImage(cip_paths(shared_data_dir)[0])


@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_nrrd_and_mha_read_like_the_nifti_of_the_same_image(cip_image, tmp_path, orientation):
    image = with_direction(cip_image, DIRECTIONS[orientation])
    image.SetOrigin((12.5, -40.25, 7.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    reference = load_volume(tmp_path / "ct.nii.gz")
    for suffix in SUFFIXES:
        sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"), True)
        volume = loader.load_any(tmp_path / f"ct{suffix}")
        assert volume.source_format == ("nrrd" if suffix in (".nrrd", ".nhdr") else "metaimage")
        assert volume.kind == "image" and volume.domain == "hu" and volume.spacing_known
        np.testing.assert_array_equal(volume.data, reference.data)
        np.testing.assert_allclose(volume.geometry.affine, reference.geometry.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "coronal", "oblique"])
def test_mask_saved_for_an_nrrd_or_mha_ct_round_trips_in_its_format(cip_image, tmp_path, suffix, orientation):
    image = with_direction(cip_image, DIRECTIONS[orientation])
    ct_path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(ct_path), True)
    ct = loader.load_any(ct_path)
    mask = ((ct.data > -950) & (ct.data < -500)).astype(np.uint8)
    mask[ct.data > 300] = 2
    target = tmp_path / f"ct_lung{loader.mask_suffix(ct.source_path)}"
    assert target.suffix == (".mha" if suffix == ".mhd" else suffix)
    assert loader.save_any(target, mask, ct.geometry) == target
    back = loader.load_any(target)
    assert back.kind == "labels" and back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, mask)
    check_same_grid(back, ct)
    # other tools agree on the grid: SimpleITK reads the same spacing, origin and direction
    written = sitk.ReadImage(str(target))
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    # never replaced without asking, never a temporary file left behind
    with pytest.raises(OutputExistsError):
        loader.save_any(target, np.zeros_like(mask), ct.geometry)
    np.testing.assert_array_equal(loader.load_any(target).data, mask)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_a_mask_of_an_nrrd_ct_may_also_be_saved_as_nifti_on_the_same_grid(cip_image, tmp_path):
    sitk.WriteImage(with_direction(cip_image, DIRECTIONS["oblique"]), str(tmp_path / "ct.nrrd"), True)
    ct = loader.load_any(tmp_path / "ct.nrrd")
    mask = (ct.data > -500).astype(np.uint8)
    back = loader.load_any(loader.save_any(tmp_path / "mask.nii.gz", mask, ct.geometry))
    np.testing.assert_array_equal(back.data, mask)
    check_same_grid(back, ct)


def test_two_file_formats_are_not_written_and_unknown_suffixes_are_named(cip_image, tmp_path):
    sitk.WriteImage(cip_image, str(tmp_path / "ct.nrrd"))
    ct = loader.load_any(tmp_path / "ct.nrrd")
    for name, words in (("m.nhdr", "m.nrrd"), ("m.mhd", "m.mha"), ("m.png", ".nii.gz, .nii, .nrrd, .mha")):
        with pytest.raises(InputError) as info:
            loader.save_any(tmp_path / name, np.zeros(ct.data.shape, np.uint8), ct.geometry)
        assert words in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["ct.nrrd"]


def _bad_files(tmp_path):
    (tmp_path / "text.nrrd").write_text("patient 12, see PACS\n" * 10)
    rgb = sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "colour.mha"))
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    sitk.WriteImage(sitk.Image([16, 16, 4, 3], sitk.sitkInt16), str(tmp_path / "series.mha"))
    full = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (8, 32, 32)).astype(np.int16))
    sitk.WriteImage(full, str(tmp_path / "full.nrrd"))
    data = (tmp_path / "full.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    return {"text.nrrd": "could not be read as NRRD", "colour.mha": "3 values per voxel",
            "flat.nrrd": "2D image", "series.mha": "3 volumes", "cut.nrrd": "truncated"}


def test_bad_nrrd_and_mha_files_give_a_message(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as info:
            loader.load_any(tmp_path / name)
        assert words in str(info.value) and name in str(info.value), str(info.value)
