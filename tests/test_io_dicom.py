"""DICOM CT series open as the same volume as the NIfTI of the same data: HU, spacing, origin,
direction; slices ordered by position; gaps, duplicates, tilt, several series and non-CT objects
reported with the series and the reason.  Series are built in tmp_path from the real HU CT of
../shared/data/cip_ct64 with SimpleITK's DICOM writer."""

import shutil
import zipfile

import numpy as np
import pytest

from io_helpers import cip_paths, rotation, set_transfer_syntax, with_direction, write_series
from napari_covidseg.errors import InputError
from napari_covidseg.intensity import HU
from napari_covidseg.io import loader
from napari_covidseg.io.nifti import load_volume

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("pydicom")


@pytest.fixture
def cip(shared_data_dir):
    ct_path, _ = cip_paths(shared_data_dir)
    return sitk.ReadImage(ct_path), load_volume(ct_path)


def _same_volume(volume, reference, atol=1e-4):
    assert volume.kind == "image" and volume.domain == HU and volume.spacing_known
    assert volume.data.dtype == reference.data.dtype
    np.testing.assert_array_equal(volume.data, reference.data)
    np.testing.assert_allclose(volume.geometry.affine, reference.geometry.affine, atol=atol)
    np.testing.assert_allclose(volume.spacing, reference.spacing, rtol=1e-6)


def test_shuffled_series_equals_the_nifti_in_hu_spacing_origin_direction(cip, tmp_path):
    image, reference = cip
    write_series(tmp_path / "dicom", image, 3, "Thorax 4.0")
    volume = loader.load_any(tmp_path / "dicom")
    _same_volume(volume, reference)
    assert volume.source_format == "dicom" and "Thorax 4.0" in volume.description and volume.notes == []
    # the file holds unsigned raw values: the HU come from RescaleIntercept
    import pydicom

    a_file = next((tmp_path / "dicom").iterdir())
    ds = pydicom.dcmread(str(a_file))
    assert float(ds.RescaleIntercept) == -1024 and int(ds.pixel_array.min()) >= 0
    assert float(reference.data.min()) < 0


def test_slices_are_ordered_by_position_not_instance_number(cip, tmp_path):
    import pydicom

    image, reference = cip
    write_series(tmp_path / "dicom", image, 3, "chest")
    numbers = {}
    for path in (tmp_path / "dicom").iterdir():
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        numbers[float(ds.ImagePositionPatient[2])] = int(ds.InstanceNumber)
    ordered = [numbers[z] for z in sorted(numbers)]
    assert ordered != sorted(ordered)  # the fixture really scrambles instance numbers
    _same_volume(loader.load_any(tmp_path / "dicom"), reference)


def test_fractional_rescale_slope_is_applied(cip, tmp_path):
    import pydicom

    image, _ = cip
    write_series(tmp_path / "dicom", image[:, :, :4], 3, "chest", shuffle_seed=None)
    raws = []
    for path in sorted((tmp_path / "dicom").iterdir()):
        ds = pydicom.dcmread(str(path))
        ds.RescaleSlope = "0.5"
        ds.save_as(str(path))
        raws.append(ds.pixel_array.astype(np.float64))
    volume = loader.load_any(tmp_path / "dicom")
    expected = np.stack(raws) * 0.5 - 1024  # (z, row, col) of a LPS series = display order
    np.testing.assert_allclose(volume.data, expected, atol=1e-3)
    assert volume.data.dtype == np.float32


@pytest.mark.parametrize("axis, degrees", [((0, 0, 1), 25.0), ((1, 0.3, 0.2), 17.0), ((1, 0, 0), 90.0)])
def test_oblique_series_matches_the_nifti_written_from_the_same_image(cip, tmp_path, axis, degrees):
    image, _ = cip
    oblique = with_direction(image, rotation(axis, degrees))
    sitk.WriteImage(oblique, str(tmp_path / "oblique.nii.gz"))
    write_series(tmp_path / "dicom", oblique, 4, "oblique")
    _same_volume(loader.load_any(tmp_path / "dicom"), load_volume(tmp_path / "oblique.nii.gz"))


def test_gantry_tilt_is_kept_in_the_affine_and_reported(cip, tmp_path):
    image, reference = cip
    dz = image.GetSpacing()[2]
    shift = dz * np.tan(np.radians(15.0))  # each slice moves posterior (LPS +y) as the gantry tilts 15 degrees
    write_series(tmp_path / "dicom", image, 5, "tilted", shear=(0.0, shift, 0.0))
    volume = loader.load_any(tmp_path / "dicom")
    np.testing.assert_array_equal(volume.data, reference.data)  # shown as acquired
    step_ras = volume.geometry.affine[:3, 2]
    np.testing.assert_allclose(step_ras, [0.0, -shift, dz], atol=1e-4)  # RAS: posterior is -y
    assert any("gantry tilt of 15.0 degrees" in note for note in volume.notes)
    # a mask saved for it keeps the tilt in NIfTI, and NRRD refuses what it cannot store
    mask = (volume.data > -500).astype(np.uint8)
    saved = loader.save_any(tmp_path / "mask.nii.gz", mask, volume.geometry)
    back = loader.load_any(saved)
    np.testing.assert_array_equal(back.data, mask)
    np.testing.assert_allclose(back.geometry.affine, volume.geometry.affine, atol=1e-4)
    with pytest.raises(InputError, match="not perpendicular"):
        loader.save_any(tmp_path / "mask.nrrd", mask, volume.geometry)
    assert not (tmp_path / "mask.nrrd").exists()


def test_missing_slice_is_refused_with_where(cip, tmp_path):
    image, _ = cip
    write_series(tmp_path / "dicom", image, 3, "gap", skip=[40])
    with pytest.raises(InputError) as info:
        loader.load_any(tmp_path / "dicom")
    message = str(info.value)
    assert "series 3 'gap'" in message and "1 slice(s) are missing" in message and "copy the complete series" in message


def test_duplicate_file_is_read_once_and_different_images_at_one_position_are_refused(cip, tmp_path):
    image, reference = cip
    folder = tmp_path / "dicom"
    write_series(folder, image, 3, "chest", shuffle_seed=None)
    shutil.copy(folder / "IM0010.dcm", folder / "copy_of_10.dcm")
    volume = loader.load_any(folder)
    _same_volume(volume, reference)
    assert any("1 duplicate file(s) ignored" in note for note in volume.notes)
    # another image at the position of slice 10 under the same series UID
    other = image[:, :, :] * 0 + 100
    other.CopyInformation(image)
    uid = loader.dicom.read_header(folder / "IM0010.dcm").SeriesInstanceUID
    write_series(tmp_path / "tmp", other[:, :, 10:11], 3, "chest", shuffle_seed=None)
    import pydicom

    ds = pydicom.dcmread(str(tmp_path / "tmp" / "IM0000.dcm"))
    ds.SeriesInstanceUID = uid
    ds.ImagePositionPatient = pydicom.dcmread(str(folder / "IM0010.dcm")).ImagePositionPatient
    ds.save_as(str(folder / "other_10.dcm"))
    with pytest.raises(InputError, match="different images at the same position"):
        loader.load_any(folder)


def _folder_with_two_ct_series_and_others(image, folder):
    uid_a = write_series(folder, image, 2, "Lung 4.0", prefix="A")
    uid_b = write_series(folder, image[:, :, 10:50], 6, "Part 4.0", prefix="B")
    write_series(folder, image[:, :, :1], 1, "Topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", prefix="L")
    write_series(folder, image[:, :, :1], 8, "Dose report", modality="OT", intercept=None, prefix="S")
    write_series(folder, image[:, :, :12], 9, "T1 brain", modality="MR", intercept=None, prefix="M")
    return uid_a, uid_b


def test_truncated_files_are_reported(cip, tmp_path):
    image, reference = cip
    folder = tmp_path / "dicom"
    write_series(folder, image, 3, "chest", shuffle_seed=None)
    data = (folder / "IM0005.dcm").read_bytes()
    (folder / "cut_header.dcm").write_bytes(data[:300])  # the DICM marker, then the header stops
    volume = loader.load_any(folder)
    _same_volume(volume, reference)
    assert any("1 file(s) with the DICOM marker could not be read (e.g. cut_header.dcm)" in n for n in volume.notes)
    (folder / "IM0005.dcm").write_bytes(data[:-3000])  # a slice whose pixel data ends early
    with pytest.raises(InputError, match="pixel data of IM0005.dcm could not be decoded.*truncated"):
        loader.load_any(folder)


def test_several_series_the_user_chooses_and_others_say_why(cip, tmp_path):
    image, reference = cip
    folder = tmp_path / "study"
    uid_a, uid_b = _folder_with_two_ct_series_and_others(image, folder / "sub")  # series in a sub-folder
    with pytest.raises(InputError) as info:
        loader.load_any(folder)
    assert "holds 2 CT series" in str(info.value) and "--series" in str(info.value)
    listed, volume = loader.survey(folder)
    assert volume is None
    assert [s["number"] for s in listed] == [1, 2, 6, 8, 9]
    assert [s["usable"] for s in listed] == [False, True, True, False, False]
    by_number = {s["number"]: s for s in listed}
    assert "localizer / scout" in by_number[1]["problem"]
    assert "secondary capture" in by_number[8]["problem"]
    assert "modality is MR" in by_number[9]["problem"]
    _same_volume(loader.load_any(folder, series="2"), reference)
    part = loader.load_any(folder, series=uid_b)
    np.testing.assert_array_equal(part.data, reference.data[10:50])
    for choice, words in (("1", "series 1 'Topogram'"), ("4", "series 8 'Dose report'"), ("5", "'T1 brain' (MR"),
                          ("7", "no series number 7"), ("1.2.3", "no series with UID 1.2.3")):
        with pytest.raises(InputError, match="cannot be opened|no series") as info:
            loader.load_any(folder, series=choice)
        assert words in str(info.value)
    volumes, problems = loader.load_all(folder)
    assert [v.description for v in volumes] == ["series 2 'Lung 4.0'", "series 6 'Part 4.0'"]
    assert len(problems) == 3 and all("cannot be opened" in p for p in problems)


def test_one_file_of_a_series_opens_its_series_and_a_zip_opens_like_the_folder(cip, tmp_path):
    image, reference = cip
    folder = tmp_path / "study"
    _folder_with_two_ct_series_and_others(image, folder)
    one_file = sorted(folder.glob("B*"))[0]
    np.testing.assert_array_equal(loader.load_any(one_file).data, reference.data[10:50])
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"export/{path.name}")
    volume = loader.load_any(archive, series="2")
    _same_volume(volume, reference)
    assert volume.source_path == str(archive.resolve())
    volumes, problems = loader.load_all(archive)
    assert len(volumes) == 2 and len(problems) == 3


def test_compressed_series_opens_and_undecodable_transfer_syntax_is_named(cip, tmp_path):
    image, reference = cip
    write_series(tmp_path / "j2k", image, 3, "j2k", compressor="JPEG2000")
    _same_volume(loader.load_any(tmp_path / "j2k"), reference)
    write_series(tmp_path / "htj2k", image[:, :, :5], 4, "ht", shuffle_seed=None)
    for path in (tmp_path / "htj2k").iterdir():
        set_transfer_syntax(path, "1.2.840.10008.1.2.4.201")
    with pytest.raises(InputError) as info:
        loader.load_any(tmp_path / "htj2k")
    message = str(info.value)
    assert "series 4 'ht'" in message and "High-Throughput JPEG 2000" in message and "cannot read" in message


def test_a_folder_without_dicom_or_slices_and_a_broken_zip_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no slice images .* and no DICOM files"):
        loader.load_any(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a valid zip"):
        loader.load_any(tmp_path / "bad.zip")
    (tmp_path / "fake.dcm").write_bytes(b"hello")
    with pytest.raises(InputError, match="not a DICOM file"):
        loader.load_any(tmp_path / "fake.dcm")
