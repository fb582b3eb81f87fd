"""Training data layouts, splits and augmentation (no training here: fast)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg.errors import DataFolderError
from training.augment import augment
from training.cli import main
from training.datasets import detect_layout, load_cases
from training.splits import make_split

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (6, 20, 24)  # file order (x, y, z) is irrelevant here: all files share one grid


def _ct(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 300, size=SHAPE).astype(np.int16)


def _write(path: Path, array, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.asarray(array, dtype=dtype or array.dtype), np.diag([0.8, 0.8, 2.5, 1.0])).to_filename(str(path))


def _labels(values=(0, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(values, size=SHAPE).astype(np.uint8)


def make_pairs(root: Path, n=3):
    for i in range(n):
        _write(root / "images" / f"c{i}.nii.gz", _ct(i))
        _write(root / "lung" / f"c{i}.nii.gz", _labels((0, 1), i))
        if i != 1:
            _write(root / "infection" / f"c{i}.nii.gz", _labels((0, 1), i + 10))
    return root


def test_pairs_layout(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    assert detect_layout(str(root)) == "pairs"
    layout, cases = load_cases(str(root))
    assert layout == "pairs" and [c.case_id for c in cases] == ["c0", "c1", "c2"]
    assert cases[1].infection is None and cases[1].labels() == ["lung"]
    assert cases[0].ct.shape == cases[0].lung.shape and set(np.unique(cases[0].lung)) <= {0, 1}
    assert cases[0].spacing[0] == pytest.approx(2.5)


def test_covid19ctseg_layout_lung_labels_1_and_2(tmp_path):
    root = tmp_path / "zenodo"
    for i in range(2):
        _write(root / "COVID-19-CT-Seg_20cases" / f"case{i}.nii.gz", _ct(i))
        lung = _labels((0, 1, 2), i)
        _write(root / "Lung_Mask" / f"case{i}.nii.gz", lung)
        _write(root / "Infection_Mask" / f"case{i}.nii.gz", _labels((0, 1), i + 5))
    assert detect_layout(str(root)) == "covid19ctseg"
    _, cases = load_cases(str(root))
    assert len(cases) == 2
    raw = np.asarray(nib.load(str(root / "Lung_Mask" / "case0.nii.gz")).dataobj)
    assert cases[0].lung.sum() == np.count_nonzero(np.isin(raw, (1, 2)))


def test_medseg_layout_effusion_is_not_infection(tmp_path):
    root = tmp_path / "medseg"
    _write(root / "tr_im.nii.gz", _ct(0))
    mask = _labels((0, 1, 2, 3), 1)
    _write(root / "tr_mask.nii.gz", mask)
    assert detect_layout(str(root)) == "medseg"
    with pytest.warns(UserWarning, match="patient"):
        _, cases = load_cases(str(root))
    stacked = np.concatenate([c.infection for c in cases])
    assert stacked.sum() == np.count_nonzero(np.isin(mask, (1, 2)))
    assert all(c.lung is None for c in cases)
    split = make_split([c.case_id for c in cases], [c.group for c in cases], val_fraction=0.5)
    assert set(split["train"]).isdisjoint(split["val"])


def test_check_data_cli_prints_json(tmp_path, capsys):
    root = make_pairs(tmp_path / "pairs")
    assert main(["check-data", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "pairs" and report["n_cases"] == 3
    assert report["cases"][1]["labels"] == ["lung"]


@pytest.mark.parametrize("problem", ["empty", "missing_mask", "shape", "not_nifti", "unknown", "missing_folder"])
def test_bad_data_folders_give_clear_errors(tmp_path, capsys, problem):
    root = tmp_path / "data"
    root.mkdir()
    expected = {"empty": "empty", "missing_mask": "no mask found", "shape": "shape", "not_nifti": "no NIfTI",
                "unknown": "cannot tell the layout", "missing_folder": "does not exist"}[problem]
    if problem == "missing_mask":
        make_pairs(root)
        _write(root / "images" / "orphan.nii.gz", _ct(9))
    elif problem == "shape":
        make_pairs(root)
        _write(root / "lung" / "c0.nii.gz", np.zeros((6, 20, 23), np.uint8))
    elif problem == "not_nifti":
        (root / "images").mkdir()
        (root / "images" / "scan.dcm").write_bytes(b"DICM")
    elif problem == "unknown":
        _write(root / "scan.nii.gz", _ct(0))
    elif problem == "missing_folder":
        root = tmp_path / "nowhere"
    with pytest.raises(DataFolderError, match=expected):
        load_cases(str(root))
    assert main(["check-data", str(root)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_split_is_case_level_and_reproducible():
    ids = [f"c{i}" for i in range(10)]
    groups = [f"g{i // 2}" for i in range(10)]
    a = make_split(ids, groups, val_fraction=0.2, seed=3)
    assert a == make_split(ids, groups, val_fraction=0.2, seed=3)
    for part in ("train", "val"):
        for other in ("val", "test"):
            if part != other:
                assert set(a[part]).isdisjoint(a[other])
    side = {cid: ("val" if cid in a["val"] else "train") for cid in ids}
    assert all(side[f"c{2 * g}"] == side[f"c{2 * g + 1}"] for g in range(5))  # a group never straddles
    folds = [make_split(ids, groups, folds=5, fold=k, seed=0)["val"] for k in range(5)]
    assert sorted(sum(folds, [])) == sorted(ids)
    with pytest.raises(DataFolderError):
        make_split(["only"], val_fraction=0.2)


@pytest.mark.parametrize("shape", [(32, 40), (8, 24, 24)])
def test_augment_keeps_shapes_binary_masks_and_is_seeded(shape):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    mask = (rng.random(shape) > 0.7).astype(np.float32)
    names = ["flip", "rotate", "scale", "elastic", "gamma", "brightness", "contrast", "noise"]
    probs = {n: 1.0 for n in names}
    a_img, (a_mask,) = augment(image, [mask], names, np.random.default_rng(5), probs)
    b_img, (b_mask,) = augment(image, [mask], names, np.random.default_rng(5), probs)
    assert a_img.shape == shape and a_mask.shape == shape
    assert set(np.unique(a_mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(a_img, b_img)
    assert not np.array_equal(a_img, image)


def test_training_package_imports_no_qt_or_napari():
    code = (
        "import sys, pkgutil, importlib, training\n"
        "for m in pkgutil.iter_modules(training.__path__):\n"
        "    if m.name != '__main__':  # running it would start the CLI\n"
        "        importlib.import_module('training.' + m.name)\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PySide2', 'PyQt6', 'PySide6') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plateau_and_augmentation_probability_come_from_the_paper_recipe():
    """QC-HC: reduce-on-plateau x0.1 with the paper's patience, every augmentation at p = 0.15."""
    from training.config import build_config
    from training.trainer import make_optimizer, make_scheduler

    cfg = build_config(network="qchc_unet3d", data="phantom", out="unused")
    assert cfg.schedule == "plateau" and cfg.plateau_factor == 0.1 and cfg.plateau_patience == 20
    assert cfg.augmentation and set(cfg.augmentation_probabilities.values()) == {0.15}
    import torch

    sched = make_scheduler(cfg, make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))]))
    assert sched.factor == 0.1 and sched.patience == 20
    flagged = build_config(network="qchc_unet3d", data="phantom", out="unused", plateau_factor=0.5, augmentation=["none"])
    assert flagged.plateau_factor == 0.5 and flagged.augmentation == []


def test_covid19ctseg_reads_8bit_cases_in_the_display_domain(tmp_path):
    """Half of the real release (the Radiopaedia cases) is 0..255 display intensities, not HU:
    they are read, marked as 8-bit, with their placeholder-free spacing kept as given."""
    root = tmp_path / "zenodo"
    rng = np.random.default_rng(3)
    _write(root / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz", _ct(0))
    _write(root / "COVID-19-CT-Seg_20cases" / "radiopaedia_4_85506_1.nii.gz", rng.integers(0, 256, size=SHAPE).astype(np.int16))
    for cid in ("coronacases_001", "radiopaedia_4_85506_1"):
        _write(root / "Lung_Mask" / f"{cid}.nii.gz", _labels((0, 1, 2)))
        _write(root / "Infection_Mask" / f"{cid}.nii.gz", _labels((0, 1)))
    _, cases = load_cases(str(root))
    assert {c.case_id: c.domain for c in cases} == {"coronacases_001": "hu", "radiopaedia_4_85506_1": "display8"}
    assert cases[1].ct.dtype == np.uint8
