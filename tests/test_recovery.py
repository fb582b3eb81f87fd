"""Exact recovery: a training killed anywhere (in a step, inside checkpoint writes, between best.pt,
last.pt and the log, at a random moment) or stopped by SIGTERM mid-epoch, then resumed with
``--resume auto``, ends with the same weights, optimizer state and metrics as an uninterrupted run,
a complete metrics log (every epoch once), a consistent best.pt and no temporary files left."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.cli import main

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["--device", "cpu", "--threads", "1", "--network", "unet", "--network-kwargs", '{"base": 4, "depth": 2}',
           "--input-size", "64", "64", "--batch-size", "2", "--slices-per-epoch", "12", "--lr", "0.01",
           "--augmentation", "flip", "rotate", "gamma", "--quiet"]
TINY = ["train", "--data", "phantom", "--phantom-cases", "4", "--phantom-shape", "12", "64", "64", *OPTIONS]
EPOCHS = 3  # 6 steps each


def _pairs_folder(root: Path) -> Path:
    """The 4 tiny phantoms of TINY as a pairs folder (reading it is 10x faster than making them: the
    kill test starts a dozen runs)."""
    from napari_covidseg.io.geometry import Geometry
    from napari_covidseg.io.nifti import save_volume
    from training.datasets import phantom_cases

    for case in phantom_cases(4, (12, 64, 64)):
        geometry = Geometry.from_display_spacing(case.ct.shape, case.spacing)
        for folder, array in (("images", case.ct), ("lung", case.lung), ("infection", case.infection)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            save_volume(root / folder / f"{case.case_id}.nii.gz", array, geometry)
    return root


def _records(out: Path):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be whole JSON


def _same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _run_plan(tmp_path, runs):
    data = _pairs_folder(tmp_path / "data")
    plan = {"args": ["train", "--data", str(data), *OPTIONS, "--epochs", str(EPOCHS)], "reference": str(tmp_path / "reference"),
            "out": str(tmp_path / "killed"), "runs": runs}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_driver.py"), str(tmp_path / "plan.json"),
                           str(tmp_path / "result.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(tmp_path):
    rng = random.Random(11)
    runs = [
        {"kill": "step", "n": 3},  # mid epoch 1, before any checkpoint
        {"kill": "save", "target": "best.pt", "n": 1, "phase": "during"},  # half a best.pt written
        {"kill": "save", "target": "last.pt", "n": 1, "phase": "before_replace"},  # best.pt new, last.pt not
        {"kill": "record", "n": 1},  # both checkpoints written, the epoch record not logged
        {"kill": "sigterm", "n": 2},  # a clean stop after 2 steps of epoch 2: resumes mid-epoch
        {"kill": "save", "target": "last.pt", "n": 1, "phase": "after_replace"},  # last.pt renamed, no record
        {"kill": "external", "delay": round(rng.uniform(0.3, 1.5), 2)},  # SIGKILL at a random moment
        {"kill": "step", "n": rng.randint(1, 5)},  # in a step of epoch 3 (if the run got there)
        {"kill": None},
        {"kill": None},  # nothing left to do: resuming a finished run changes nothing
    ]
    result = _run_plan(tmp_path, runs)
    assert result["reference"] == "exit 0"
    statuses = [r["status"] for r in result["runs"]]
    assert statuses[:4] == ["exit 137"] * 4 and statuses[4] == "exit 0" and statuses[5] == "exit 137", statuses
    assert statuses[-2:] == ["exit 0", "exit 0"], statuses
    ref, out = tmp_path / "reference", tmp_path / "killed"

    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["extra"]["epoch"] == b["extra"]["epoch"] == EPOCHS
    _same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    _same_tensors(a["extra"]["optimizer"], b["extra"]["optimizer"], "optimizer")
    _same_tensors(a["extra"]["scheduler"], b["extra"]["scheduler"], "scheduler")
    _same_tensors(torch.load(ref / "best.pt", weights_only=True)["state_dict"],
                  torch.load(out / "best.pt", weights_only=True)["state_dict"], "best.pt")

    # the log: every epoch exactly once, with the uninterrupted run's numbers
    ref_epochs = [r for r in _records(ref) if r["event"] == "epoch"]
    epochs = [r for r in _records(out) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, EPOCHS + 1))
    for x, y in zip(ref_epochs, epochs):
        for key in ("train_loss", "val_loss", "val_dice_mean", "lr", "val"):
            assert x[key] == y[key], (x["epoch"], key)
    assert sum(1 for r in epochs if r.get("recovered")) >= 2  # the two records the kills kept from the log
    resumed = [r for r in _records(out) if r["event"] == "start"]
    assert any(r["resumed_from_step"] == 2 for r in resumed)  # the SIGTERM stop resumed mid-epoch
    # best.pt is the best epoch the log reports; no temporary file is left behind
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["val_dice_mean"] == max(r["val_dice_mean"] for r in epochs)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert "temporary file(s) of an interrupted run" in (out / "train.log").read_text()


def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    """In-process: a stop after step 4 of epoch 1 (6 steps), then --resume auto: bit-identical to a run
    that was never stopped (the interrupted epoch is not redone from its partial weights)."""
    import training.trainer as trainer_module

    args = TINY + ["--epochs", "2"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    real_step = torch.amp.GradScaler.step
    calls = {"n": 0}

    def step_then_stop(self, optimizer, *a, **k):
        out = real_step(self, optimizer, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4:
            trainer_module.StopFlag.set(stop_flags[-1])
        return out

    stop_flags = []
    real_install = trainer_module.StopFlag.install

    def install(self):
        stop_flags.append(self)
        return real_install(self)

    monkeypatch.setattr(trainer_module.StopFlag, "install", install)
    monkeypatch.setattr(torch.amp.GradScaler, "step", step_then_stop)
    assert main(args + ["--out", str(tmp_path / "part")]) == 0
    monkeypatch.setattr(torch.amp.GradScaler, "step", real_step)
    stopped = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["extra"]
    assert (stopped["epoch"], stopped["step"]) == (0, 4) and _records(tmp_path / "part")[-1]["status"] == "stopped"
    assert main(args + ["--out", str(tmp_path / "part"), "--resume", "auto"]) == 0
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    _same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    _same_tensors(a["extra"]["optimizer"], b["extra"]["optimizer"], "optimizer")
    full = [r for r in _records(tmp_path / "full") if r["event"] == "epoch"]
    part = [r for r in _records(tmp_path / "part") if r["event"] == "epoch"]
    assert [(r["epoch"], r["train_loss"], r["val_dice_mean"]) for r in full] == \
        [(r["epoch"], r["train_loss"], r["val_dice_mean"]) for r in part]


def test_checkpoint_of_the_previous_trainer_still_resumes(tmp_path):
    """A last.pt as the trainer wrote it before this version (no digest, step, epoch state or record)
    loads, resumes and ends where an uninterrupted run ends."""
    from checkpoint_helpers import craft

    args = TINY + ["--epochs", "2"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert main(args + ["--out", str(tmp_path / "old"), "--stop-after-epochs", "1"]) == 0
    raw = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    for key in ("step", "epoch_state", "record"):
        raw["extra"].pop(key)
    assert set(raw["extra"]) == {"optimizer", "scheduler", "scaler", "epoch", "best", "rng", "sampler_epoch", "config",
                                 "wall_seconds"}
    craft(raw, tmp_path / "old" / "last.pt", digest="drop")
    assert main(args + ["--out", str(tmp_path / "old"), "--resume", "auto"]) == 0
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    _same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    assert "digest" in b  # written anew by this version
