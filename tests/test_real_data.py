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


# --- issue 9: both intensity domains on the real sets --------------------------------------------
REAL_SETS = {  # set -> (domain, spacing is real)
    "covid19ctseg_dstaroff": ("display8", False),
    "covidsemiseg_infnet": ("display8", False),
    "cip_ct64": ("hu", True),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_every_shared_set_opens_in_its_domain_with_its_geometry(shared_data_dir, name):
    import nibabel as nib

    domain, spacing_known = REAL_SETS[name]
    path = sorted((Path(shared_data_dir) / name / "images").glob("*.nii.gz"))[0]
    vol = load_volume(path)
    assert (vol.kind, vol.domain, vol.spacing_known) == ("image", domain, spacing_known)
    header_zooms = nib.load(str(path)).header.get_zooms()[:3]
    assert sorted(vol.spacing) == pytest.approx(sorted(float(z) for z in header_zooms))
    assert vol.data.dtype == (np.uint8 if domain == "display8" else np.int16)


@pytest.mark.realdata
def test_8bit_real_ct_opens_in_napari_with_the_note(shared_data_dir, make_napari_viewer, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_info", lambda message: shown.append(message))
    viewer = make_napari_viewer()
    path = Path(shared_data_dir) / "covid19ctseg_dstaroff" / "images" / "rp07.nii.gz"
    layers = viewer.open(str(path), plugin="napari-covidseg")
    assert layers[0].name == "rp07 [8-bit, not HU]" and tuple(layers[0].contrast_limits) == (0.0, 255.0)
    assert len(shown) == 1 and "not a CT in Hounsfield units" in shown[0] and "placeholder" in shown[0]
    hu = viewer.open(str(Path(shared_data_dir) / "cip_ct64" / "images" / "ct-64.nii.gz"), plugin="napari-covidseg")
    assert hu[0].name == "ct-64" and tuple(hu[0].contrast_limits) == (-1350.0, 150.0) and len(shown) == 1


@pytest.mark.realdata
def test_training_reads_all_three_shared_folders_together(shared_data_dir):
    from training.datasets import check_data

    root = Path(shared_data_dir)
    report = check_data([str(root / "covid19ctseg_dstaroff"), f"{root / 'covidsemiseg_infnet'},labels=infection",
                         str(root / "cip_ct64")])
    assert [s["n_cases"] for s in report["sources"]] == [14, 50, 1]
    assert report["domains"]["display8"]["cases"] == 64 and report["domains"]["hu"]["cases"] == 1
    assert report["sources"][1]["labels"] == {"lung": 0, "infection": 50}
    assert report["domains"]["display8"]["spacing_known"] == 0 and report["domains"]["hu"]["spacing_known"] == 1


@pytest.mark.realdata
@pytest.mark.parametrize("network", ["unet", "ms_unet", "msa_cpp_unet", "qchc_unet3d", "chs_net"])
def test_shipped_network_segments_the_lungs_of_a_real_case(shared_data_dir, network):
    """Smoke test: a held-out COVID-19-CT-Seg patient group (rp07, 22 slices, never trained on)."""
    from napari_covidseg.checkpoint import load_shipped
    from napari_covidseg.inference import segment_volume
    from napari_covidseg.metrics import dice

    root = Path(shared_data_dir) / "covid19ctseg_dstaroff"
    ct, lung = load_volume(root / "images" / "rp07.nii.gz"), load_volume(root / "lung" / "rp07.nii.gz")
    loaded = load_shipped(network)
    result = segment_volume(loaded, ct.data, ct.spacing, domain=ct.domain)
    assert dice(result.lung, lung.data) >= 0.9
