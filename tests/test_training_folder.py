"""Adding corrected cases to a training folder in the ``pairs`` layout."""

import numpy as np
import pytest

from napari_covidseg.errors import DataFolderError, InputError
from napari_covidseg.io.geometry import Geometry
from napari_covidseg.io.nifti import load_volume
from napari_covidseg.training_folder import (
    add_case,
    case_exists,
    case_id_from_name,
    list_cases,
    suggest_case_id,
    validate_case_id,
)


def _case(shape=(6, 12, 10)):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 400, size=shape).astype(np.int16)
    lung = np.zeros(shape, np.uint8)
    lung[1:5, 2:10, 1:4] = 2  # right lung (display columns grow toward the patient's left)
    lung[1:5, 2:10, 6:9] = 1
    infection = np.zeros(shape, np.uint8)
    infection[2:4, 4:7, 6:8] = 1
    geometry = Geometry.from_display_spacing(shape, (2.5, 0.8, 0.7), origin_ras=(10.0, -5.0, 30.0))
    return ct, lung, infection, geometry


def test_add_case_writes_pairs_layout(tmp_path):
    ct, lung, infection, geometry = _case()
    added = add_case(tmp_path, "patient01", ct, geometry, lung=lung, infection=infection)
    assert added.image_path == tmp_path / "images" / "patient01.nii.gz"
    assert added.lung_path == tmp_path / "lung" / "patient01.nii.gz"
    assert added.infection_path == tmp_path / "infection" / "patient01.nii.gz"
    assert added.n_cases == 1
    image = load_volume(added.image_path)
    np.testing.assert_array_equal(image.data, ct)
    np.testing.assert_allclose(image.geometry.affine, geometry.affine)
    lung_back = load_volume(added.lung_path)
    np.testing.assert_array_equal(lung_back.data, (lung != 0).astype(np.uint8))  # stored binary
    np.testing.assert_allclose(lung_back.geometry.affine, geometry.affine)
    np.testing.assert_array_equal(load_volume(added.infection_path).data, infection)


def test_one_mask_is_enough_and_none_is_refused(tmp_path):
    ct, lung, infection, geometry = _case()
    added = add_case(tmp_path, "only_infection", ct, geometry, infection=infection)
    assert added.lung_path is None and not (tmp_path / "lung" / "only_infection.nii.gz").exists()
    with pytest.raises(InputError, match="at least one mask"):
        add_case(tmp_path, "nomask", ct, geometry)
    assert not case_exists(tmp_path, "nomask")
    assert list_cases(tmp_path) == ["only_infection"]


def test_existing_case_is_never_clobbered(tmp_path):
    ct, lung, infection, geometry = _case()
    add_case(tmp_path, "c1", ct, geometry, lung=lung)
    first = (tmp_path / "images" / "c1.nii.gz").read_bytes()
    with pytest.raises(DataFolderError, match="c1_2"):
        add_case(tmp_path, "c1", ct + 1, geometry, lung=lung, infection=infection)
    assert (tmp_path / "images" / "c1.nii.gz").read_bytes() == first
    assert not (tmp_path / "infection" / "c1.nii.gz").exists()
    assert suggest_case_id(tmp_path, "c1") == "c1_2"
    added = add_case(tmp_path, suggest_case_id(tmp_path, "c1"), ct, geometry, infection=infection)
    assert added.case_id == "c1_2" and added.n_cases == 2
    assert suggest_case_id(tmp_path, "c1") == "c1_3"
    assert sorted(list_cases(tmp_path)) == ["c1", "c1_2"]


def test_bad_inputs_are_clear_errors(tmp_path):
    ct, lung, infection, geometry = _case()
    for bad in ("", "../evil", "a/b", "x.nii.gz", " "):
        with pytest.raises(InputError, match="case id"):
            add_case(tmp_path, bad, ct, geometry, lung=lung)
    with pytest.raises(InputError, match="shape"):
        add_case(tmp_path, "c", ct, geometry, lung=lung[:, :, :5])
    assert not (tmp_path / "images").exists() or list_cases(tmp_path) == []


def test_case_id_from_name():
    assert case_id_from_name("phantom CT") == "phantom_CT"
    assert case_id_from_name("coronacases_001.nii.gz") == "coronacases_001"
    assert case_id_from_name("///") == "case"
    assert validate_case_id(case_id_from_name("a b/c.nii")) == "a_b_c"


def test_cancel_or_failure_leaves_no_half_case(tmp_path, monkeypatch):
    from napari_covidseg.errors import CancelledError

    ct, lung, infection, geometry = _case()
    steps = []
    with pytest.raises(CancelledError):
        add_case(tmp_path, "c", ct, geometry, lung=lung, infection=infection,
                 progress=lambda d, t: steps.append((d, t)), should_cancel=lambda: len(steps) >= 2)
    assert steps == [(1, 3), (2, 3)]
    assert not case_exists(tmp_path, "c")

    import napari_covidseg.io.nifti as nifti

    real = nifti.save_volume
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(nifti, "save_volume", failing)
    with pytest.raises(OSError):
        add_case(tmp_path, "d", ct, geometry, lung=lung, infection=infection)
    assert not case_exists(tmp_path, "d")


def test_training_reads_what_the_gui_writes(tmp_path):
    """The folder add_case() builds is a valid ``pairs`` data folder for ``training``."""
    from training.datasets import load_cases

    ct, lung, infection, geometry = _case()
    add_case(tmp_path, "a", ct, geometry, lung=lung, infection=infection)
    add_case(tmp_path, "b", ct, geometry, infection=infection)
    layout, cases = load_cases(str(tmp_path))
    assert layout == "pairs"
    by_id = {c.case_id: c for c in cases}
    assert set(by_id) == {"a", "b"}
    a = by_id["a"]
    np.testing.assert_array_equal(a.ct, ct)
    np.testing.assert_array_equal(a.lung, (lung != 0).astype(np.uint8))
    np.testing.assert_array_equal(a.infection, infection)
    np.testing.assert_allclose(a.spacing, (2.5, 0.8, 0.7))
    assert by_id["b"].lung is None
