"""Real public chest CT from ../shared/data (see its README); every test skips when it is absent."""

from pathlib import Path

import numpy as np
import pytest

from napari_covidseg.errors import CovidsegError
from napari_covidseg.io.nifti import NotHounsfieldError, is_nifti_path, load_volume, save_volume

MAX_FILES = 3  # keep the suite fast: a few real volumes are enough to catch geometry problems


def _nifti_files(root):
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and is_nifti_path(p))
    if not files:
        pytest.skip("../shared/data holds no NIfTI file")
    return files[:MAX_FILES]


@pytest.mark.realdata
def test_real_volumes_round_trip_voxel_exact(shared_data_dir, tmp_path):
    for i, path in enumerate(_nifti_files(shared_data_dir)):
        try:
            vol = load_volume(path)
        except NotHounsfieldError:
            vol = load_volume(path, check_hounsfield=False)
        out = save_volume(tmp_path / f"{i}_{path.name.split('.')[0]}.nii.gz", vol.data, vol.geometry)
        again = load_volume(out, kind=vol.kind, check_hounsfield=False)
        assert np.array_equal(again.data, vol.data), path
        assert np.allclose(again.geometry.affine, vol.geometry.affine), path
        assert again.spacing == pytest.approx(vol.spacing), path


@pytest.mark.realdata
def test_training_reads_the_real_data_layouts(shared_data_dir):
    from training.datasets import check_data, detect_layout

    candidates = [Path(shared_data_dir)] + sorted(p for p in Path(shared_data_dir).iterdir() if p.is_dir())
    readable = []
    for folder in candidates:
        try:
            detect_layout(str(folder))
        except CovidsegError:
            continue
        readable.append(folder)
    if not readable:
        pytest.skip("no folder in ../shared/data is in a layout training reads")
    report = check_data(str(readable[0]))
    assert report["n_cases"] >= 1
