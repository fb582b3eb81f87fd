"""The napari reader and writer with the new formats: a DICOM folder gives one layer per CT series
named with its description and says why the other series were not opened; NRRD and slice folders
open with their geometry; a mask saved without a suffix gets the CT's format; sources are never
overwritten."""

import numpy as np
import pytest

from io_helpers import cip_paths, write_series, write_study
from napari_covidseg._reader import get_reader, layer_name
from napari_covidseg._writer import write_image, write_labels
from napari_covidseg.errors import InputError
from napari_covidseg.io import loader
from napari_covidseg.io.geometry import GEOMETRY_KEY
from napari_covidseg.io.nifti import SOURCE_PATH_KEY, load_volume

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("pydicom")


@pytest.fixture
def study(shared_data_dir, tmp_path):
    """A DICOM folder with two CT series of cip_ct64, a localizer and an MR series."""
    image = sitk.ReadImage(cip_paths(shared_data_dir)[0])
    folder = tmp_path / "study"
    write_study(folder, image, localizer=True)
    return folder, load_volume(cip_paths(shared_data_dir)[0])


def _capture(monkeypatch):
    shown = {"error": [], "warning": []}
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda m: shown["error"].append(m))
    monkeypatch.setattr("napari.utils.notifications.show_warning", lambda m: shown["warning"].append(m))
    return shown


def test_names_and_folders_the_reader_claims(tmp_path, study):
    folder, _ = study
    assert get_reader(str(folder)) is not None
    for name in ("ct.nrrd", "ct.mha", "ct.mhd", "ct.nhdr", "ct.zip", "ct.png", "s.JPG", "s.tiff", "IM1.dcm"):
        assert get_reader(str(tmp_path / name)) is not None, name
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert get_reader(str(tmp_path / "empty")) is None
    assert layer_name("/d/ct.nrrd") == "ct" and layer_name("/d/scan.zip") == "scan" and layer_name(str(folder)) == "study"


def test_dicom_folder_opens_one_layer_per_ct_series(make_napari_viewer, study, monkeypatch):
    folder, reference = study
    shown = _capture(monkeypatch)
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder), plugin="napari-covidseg")
    assert [layer.name for layer in layers] == ["study series 2 'Lung 4.0'", "study series 6 'Part 4.0'"]
    lung, part = layers
    np.testing.assert_array_equal(lung.data, reference.data)
    np.testing.assert_allclose(lung.scale, reference.spacing, rtol=1e-6)
    np.testing.assert_allclose(lung.metadata[GEOMETRY_KEY].affine, reference.geometry.affine, atol=1e-4)
    assert lung.metadata[SOURCE_PATH_KEY] == str(folder.resolve())
    np.testing.assert_array_equal(part.data, reference.data[10:50])
    assert shown["error"] == [] and len(shown["warning"]) == 1
    warning = shown["warning"][0]
    assert "series 1 'Topogram'" in warning and "localizer" in warning and "series 9 'T1'" in warning and "MR" in warning


def test_folder_with_only_unusable_series_is_an_error_and_no_layer(make_napari_viewer, shared_data_dir, tmp_path, monkeypatch):
    image = sitk.ReadImage(cip_paths(shared_data_dir)[0])
    write_series(tmp_path / "scouts", image[:, :, :1], 1, "Topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    shown = _capture(monkeypatch)
    viewer = make_napari_viewer()
    assert viewer.open(str(tmp_path / "scouts"), plugin="napari-covidseg") == []
    assert len(shown["error"]) == 1 and "localizer" in shown["error"][0]
    assert len(viewer.layers) == 0


def test_mask_of_an_nrrd_ct_saved_without_suffix_is_nrrd_and_the_ct_is_never_overwritten(make_napari_viewer, study, tmp_path):
    _, reference = study
    sitk.WriteImage(sitk.ReadImage(str(reference.source_path)), str(tmp_path / "chest.nrrd"))
    viewer = make_napari_viewer()
    (ct_layer,) = viewer.open(str(tmp_path / "chest.nrrd"), plugin="napari-covidseg")
    assert ct_layer.name == "chest"
    mask = (ct_layer.data > -500).astype(np.uint8)
    meta = {"name": "lung", "scale": ct_layer.scale, "metadata": dict(ct_layer.metadata)}
    written = write_labels(str(tmp_path / "chest_lung"), mask, meta)
    assert written == [str(tmp_path / "chest_lung.nrrd")]
    back = loader.load_any(written[0])
    np.testing.assert_array_equal(back.data, mask)
    np.testing.assert_allclose(back.geometry.affine, ct_layer.metadata[GEOMETRY_KEY].affine, atol=1e-6)
    before = (tmp_path / "chest.nrrd").read_bytes()
    for writer, data in ((write_labels, mask), (write_image, ct_layer.data)):
        with pytest.raises(InputError, match="never overwritten"):
            writer(str(tmp_path / "chest.nrrd"), data, meta)
    assert (tmp_path / "chest.nrrd").read_bytes() == before


def test_mask_of_a_dicom_ct_is_saved_as_nifti_on_its_grid(study, tmp_path):
    folder, nifti_ct = study
    ct = loader.load_any(folder, series="2")
    mask = (ct.data > -500).astype(np.uint8)
    meta = {"name": "lung", "scale": ct.spacing, "metadata": {GEOMETRY_KEY: ct.geometry, SOURCE_PATH_KEY: ct.source_path}}
    (written,) = write_labels(str(tmp_path / "lung"), mask, meta)
    assert written.endswith("lung.nii.gz")
    back = loader.load_any(written)
    np.testing.assert_array_equal(back.data, mask)
    np.testing.assert_allclose(back.geometry.affine, ct.geometry.affine, atol=1e-6)
    # other tools place it where the DICOM is: SimpleITK's origin equals the first slice's position
    saved = sitk.ReadImage(str(written))
    reference = sitk.ReadImage(str(nifti_ct.source_path))
    np.testing.assert_allclose(saved.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(saved.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(saved.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_png_slice_folder_opens_as_8bit_with_placeholder_scale(make_napari_viewer, tmp_path):
    iio = pytest.importorskip("imageio.v3")
    stack = np.random.default_rng(0).integers(0, 256, (4, 24, 32)).astype(np.uint8)
    (tmp_path / "slices").mkdir()
    for k, image in enumerate(stack):
        iio.imwrite(tmp_path / "slices" / f"{k:03d}.png", image)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "slices"), plugin="napari-covidseg")
    np.testing.assert_array_equal(layer.data, stack)
    assert tuple(layer.scale) == (1.0, 1.0, 1.0)
