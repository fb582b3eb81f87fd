"""Training data folders (pairs layout) find cases in every format the loader reads: NRRD files,
DICOM series folders, folders of PNG slices; two volumes for one case id are refused."""

import numpy as np
import pytest

from io_helpers import cip_paths, write_series
from napari_covidseg.errors import DataFolderError
from training.datasets import load_cases

sitk = pytest.importorskip("SimpleITK")
iio = pytest.importorskip("imageio.v3")


def _png_folder(folder, stack):
    folder.mkdir(parents=True)
    for k, image in enumerate(stack):
        iio.imwrite(folder / f"{k}.png", image)


def test_pairs_layout_reads_nrrd_dicom_and_png_cases(shared_data_dir, tmp_path):
    ct_path, lung_path = cip_paths(shared_data_dir)
    image, lung = sitk.ReadImage(ct_path), sitk.ReadImage(lung_path)
    root = tmp_path / "data"
    for sub in ("images", "lung", "infection"):
        (root / sub).mkdir(parents=True)
    sitk.WriteImage(image, str(root / "images" / "nrrd_case.nrrd"))
    sitk.WriteImage(lung, str(root / "lung" / "nrrd_case.nrrd"))
    write_series(root / "images" / "dicom_case", image, 3, "chest")
    sitk.WriteImage(lung, str(root / "lung" / "dicom_case.nii.gz"))
    rng = np.random.default_rng(0)
    ct8 = rng.integers(0, 256, (3, 32, 40)).astype(np.uint8)
    infection = np.zeros_like(ct8)
    infection[:, 10:20, 10:30] = 255
    _png_folder(root / "images" / "png_case", ct8)
    _png_folder(root / "infection" / "png_case", infection)

    layout, cases = load_cases(str(root))
    assert layout == "pairs"
    by_id = {case.case_id: case for case in cases}
    assert sorted(by_id) == ["dicom_case", "nrrd_case", "png_case"]
    reference_lung = (sitk.GetArrayFromImage(lung) != 0)  # (z, y, x) of an LPS image = display order
    for cid in ("nrrd_case", "dicom_case"):
        case = by_id[cid]
        assert case.domain == "hu" and case.spacing_known and case.infection is None
        np.testing.assert_array_equal(case.lung, reference_lung)
        np.testing.assert_allclose(case.spacing, image.GetSpacing()[::-1], rtol=1e-5)
    png = by_id["png_case"]
    assert png.domain == "display8" and not png.spacing_known and png.lung is None
    np.testing.assert_array_equal(png.ct, ct8)
    np.testing.assert_array_equal(png.infection, infection > 0)


def test_two_volumes_for_one_case_are_refused(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "lung").mkdir()
    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (4, 8, 8)).astype(np.int16))
    sitk.WriteImage(volume, str(root / "images" / "c0.nrrd"))
    sitk.WriteImage(volume, str(root / "images" / "c0.nii.gz"))
    with pytest.raises(DataFolderError, match="are both case c0"):
        load_cases(str(root))
