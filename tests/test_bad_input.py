"""Bad files give a message (8-bit display images are not bad files: see test_intensity_domains.py) that says what is wrong and what to do: InputError in the API, a
notification (no crash, no layer) in napari, and exit status 2 with one stderr line in the CLI."""

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg.cli import main
from napari_covidseg.errors import InputError
from napari_covidseg.io.nifti import load_volume

AFFINE = np.diag([-0.7, -0.7, 2.5, 1.0])


def _nifti(path, array):
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def _ct(shape=(16, 16, 8)):
    return np.random.default_rng(0).integers(-1000, 400, size=shape).astype(np.int16)


def _truncated_gz(tmp_path):
    full = _nifti(tmp_path / "full.nii.gz", _ct((64, 64, 16)))
    data = full.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_header(tmp_path):
    full = _nifti(tmp_path / "full2.nii.gz", _ct())
    path = tmp_path / "stub.nii.gz"
    path.write_bytes(full.read_bytes()[:40])
    return path


def _truncated_plain(tmp_path):
    full = _nifti(tmp_path / "full3.nii", _ct((32, 32, 8)))
    path = tmp_path / "cut.nii"
    path.write_bytes(full.read_bytes()[:2000])
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("patient 12, CT chest, see PACS\n" * 20)
    return path


def _two_d(tmp_path):
    return _nifti(tmp_path / "slice.nii.gz", _ct()[:, :, 0])


def _multi_volume(tmp_path):
    return _nifti(tmp_path / "series.nii.gz", np.stack([_ct(), _ct()], axis=-1))


def _normalised(tmp_path):
    return _nifti(tmp_path / "norm.nii.gz", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32))


def _all_nan(tmp_path):
    return _nifti(tmp_path / "nan.nii.gz", np.full((16, 16, 8), np.nan, np.float32))


def _missing(tmp_path):
    return tmp_path / "does_not_exist.nii.gz"


# (file maker, words the message must contain)
BAD_FILES = {
    "truncated_gz": (_truncated_gz, ["truncated", "again"]),
    "truncated_header": (_truncated_header, ["stub.nii.gz"]),
    "truncated_plain": (_truncated_plain, ["cut.nii", "truncated"]),
    "text_renamed": (_text_file, ["could not be read as NIfTI", "renamed"]),
    "2d": (_two_d, ["2D", "3D CT"]),
    "multi_volume": (_multi_volume, ["time series / multi-volume", "2 volumes"]),
    "normalised": (_normalised, ["[0, 1]", "normalised", "export the CT in HU"]),
    "all_nan": (_all_nan, ["non-finite", "all voxels"]),
    "missing": (_missing, ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_core_api_raises_helpful_input_error(tmp_path, case):
    make, words = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_volume(path)
    for word in words:
        assert word in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("case", ["truncated_gz", "text_renamed", "2d", "multi_volume", "normalised", "all_nan"])
def test_cli_exit_code_2_and_one_line_message(tmp_path, capsys, case):
    make, words = BAD_FILES[case]
    path = make(tmp_path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidseg: error: ")
    assert words[0] in err and "Traceback" not in err
    assert main(["view", str(path)]) == 2  # fails before any window opens


def test_viewer_shows_notification_and_adds_no_layer(make_napari_viewer, tmp_path, monkeypatch):
    import napari_covidseg._reader as reader

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda message: shown.append(message))
    viewer = make_napari_viewer()
    for case in ("truncated_gz", "text_renamed", "multi_volume", "normalised", "all_nan"):
        make, words = BAD_FILES[case]
        path = make(tmp_path)
        layers = viewer.open(str(path), plugin="napari-covidseg")
        assert layers == []
        assert words[0] in shown[-1] and path.name in shown[-1]
    assert len(viewer.layers) == 0
    assert len(shown) == 5
    # the reader itself answers napari's "nothing to add" sentinel, not an exception
    assert reader.read_nifti(str(_all_nan(tmp_path))) == [(None,)]
