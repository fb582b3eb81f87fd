"""Training data and training errors that used to pass silently or end in a traceback: masks off their
CT's grid, duplicate case ids, a class no case has, a full disk, a resume with other settings,
a checkpoint whose network cannot be built; every CLI error is one line with exit code 2."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_covidseg.errors import DataFolderError
from training.cli import main
from training.datasets import check_data, load_cases

from checkpoint_helpers import craft

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (20, 24, 6)
AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])
TINY = ["--data", "phantom", "--phantom-cases", "4", "--phantom-shape", "12", "64", "64", "--device", "cpu",
        "--threads", "1", "--network", "unet", "--network-kwargs", '{"base": 4, "depth": 2}', "--input-size", "64", "64",
        "--batch-size", "2", "--slices-per-epoch", "4", "--quiet"]


def _write(path: Path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _pairs(root: Path, n=3, infection=True, mask_affine=None):
    rng = np.random.default_rng(0)
    for i in range(n):
        _write(root / "images" / f"c{i}.nii.gz", rng.integers(-1000, 300, SHAPE).astype(np.int16))
        lung = np.zeros(SHAPE, np.uint8)
        lung[4:16, 4:20, 1:5] = 1
        _write(root / "lung" / f"c{i}.nii.gz", lung, mask_affine if (mask_affine is not None and i == 1) else AFFINE)
        inf = np.zeros(SHAPE, np.uint8)
        if infection:
            inf[6:9, 6:9, 2:4] = 1
        _write(root / "infection" / f"c{i}.nii.gz", inf)
    return root


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name, affine", [
    ("identity", np.eye(4)),  # a converter that dropped the geometry: mirrored labels
    ("shifted", np.array([[-0.8, 0, 0, 50.0], [0, -0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]])),
    ("flipped_x", np.diag([0.8, -0.8, 2.5, 1.0])),
])
def test_a_mask_off_its_cts_grid_is_refused(tmp_path, capsys, name, affine):
    root = _pairs(tmp_path / name, mask_affine=affine)
    with pytest.raises(DataFolderError, match=r"c1.nii.gz has its CT's shape but another position/orientation.*"
                                              r"mirrored or shifted"):
        load_cases(str(root))
    assert main(["check-data", str(root)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "lung mask" in line and "c1.nii.gz" in line


def test_the_same_affine_passes_and_matches_the_viewer(tmp_path):
    layout, cases = load_cases(str(_pairs(tmp_path / "ok")))
    assert layout == "pairs" and [c.case_id for c in cases] == ["c0", "c1", "c2"]


@pytest.mark.parametrize("folder", ["images", "lung", "infection"])
def test_two_files_with_one_case_id_are_refused_not_dropped(tmp_path, capsys, folder):
    root = _pairs(tmp_path / "dup")
    source = root / folder / "c0.nii.gz"
    (root / folder / "c0.nii").write_bytes(__import__("gzip").decompress(source.read_bytes()))
    with pytest.raises(DataFolderError, match=r"c0.nii and c0.nii.gz are both case c0"):
        load_cases(str(root))
    assert main(["check-data", str(root)]) == 2
    assert "both case c0" in _one_error_line(capsys.readouterr().err)


def test_a_class_no_case_has_is_warned_about(tmp_path):
    from training.config import build_config
    from training.trainer import Trainer

    root = _pairs(tmp_path / "healthy", n=4, infection=False)
    report = check_data(str(root))
    assert any("no case has any infection voxel" in p for p in report["problems"]), report["problems"]
    cfg = build_config(None, network="unet", data=str(root), out=str(tmp_path / "run"), device="cpu",
                       network_kwargs={"base": 4, "depth": 2}, input_size=[32, 32])
    trainer = Trainer(cfg)
    trainer._setup()
    trainer._data()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: no case has any infection voxel (all 4 infection masks are empty)" in log
    assert "warning: no validation case has any infection voxel" in log
    assert "lung voxel" not in log


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


@pytest.mark.slow
def test_a_full_disk_from_the_start_ends_in_one_line(tmp_path):
    """Every write fails (RLIMIT_FSIZE 0: as on a full disk): one line, exit 2, no traceback (the
    failure handler's own log write used to raise two more)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "training", "train", *TINY, "--epochs", "1", "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "cannot read or write" in line and "check the disk" in line


def test_resume_with_other_settings_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--stop-after-epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    other_kwargs = [a if a != '{"base": 4, "depth": 2}' else '{"base": 8, "depth": 2}' for a in TINY]
    assert main(["train", *other_kwargs, "--epochs", "2", "--out", str(out), "--resume", "auto"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "was trained with network arguments {'base': 4, 'depth': 2}, this run asks for {'base': 8" in line
    assert len(line) < 400
    assert main(["train", *TINY, "--optimizer", "sgd", "--epochs", "2", "--out", str(out), "--resume", "auto"]) == 2
    assert "was trained with the 'adam' optimizer, this run uses 'sgd'" in _one_error_line(capsys.readouterr().err)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "end" and records[-1]["status"] == "failed"
    # settings that only change the result are allowed, and said
    assert main(["train", *TINY, "--lr", "0.05", "--epochs", "2", "--out", str(out), "--resume", "auto"]) == 0
    warning = next(line for line in (out / "train.log").read_text().splitlines() if "warning: resuming" in line)
    assert "(lr 0.001 -> 0.05): the result will differ" in warning  # and nothing else is reported as changed


@pytest.mark.parametrize("kwargs, words", [
    ({"base": 4, "depth": 2, "colour": "blue"}, "cannot be built"),
    ({"base": "sixteen", "depth": 2}, "cannot be built"),
    ({"base": 0, "depth": 2}, "do not fit"),
    ({"base": 1024}, "do not fit"),
    ({"base": 10**9}, "out of range"),
])
def test_evaluate_with_a_checkpoint_of_bad_network_arguments_is_one_line(tmp_path, capsys, kwargs, words):
    from napari_covidseg.checkpoint import save_checkpoint
    from napari_covidseg.models import get_network

    good = save_checkpoint(tmp_path / "good.pt", get_network("unet").create(base=4, depth=2), "unet", {"base": 4, "depth": 2})
    raw = torch.load(good, weights_only=True)
    raw["network_kwargs"] = kwargs
    bad = craft(raw, tmp_path / "bad.pt")
    code = main(["evaluate", "--checkpoint", str(bad), "--data", "phantom", "--phantom-cases", "2", "--phantom-shape",
                 "12", "64", "64", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert code == 2
    assert words in _one_error_line(capsys.readouterr().err)
