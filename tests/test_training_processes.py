"""The trainer as a process: DDP with 2 CPU processes (gloo) and a clean stop on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = ["--data", "phantom", "--phantom-cases", "4", "--phantom-shape", "12", "64", "64", "--device", "cpu",
        "--threads", "1", "--network", "unet", "--network-kwargs", '{"base": 4, "depth": 2}', "--input-size", "64", "64",
        "--batch-size", "2", "--quiet"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_cpu_processes_train_one_epoch(tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29533", "-m", "training", "train", *TINY,
           "--out", str(out), "--epochs", "1", "--slices-per-epoch", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = _records(out)
    # rank 0 only writes: one start, one epoch, one end, and progress records (every 10 s) of one writer
    assert [r["event"] for r in records if r["event"] != "step"] == ["start", "epoch", "end"]
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == sorted(set(steps))
    assert records[-1]["status"] == "finished"
    assert "2 process(es)" in (out / "train.log").read_text()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # the bare model, not the DDP wrapper


def test_sigterm_stops_cleanly_with_last_checkpoint(tmp_path):
    out = tmp_path / "stop"
    cmd = [sys.executable, "-m", "training", "train", *TINY, "--out", str(out), "--epochs", "200", "--slices-per-epoch", "400"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 150
        log = out / "metrics.jsonl"
        while time.time() < deadline and not (log.exists() and '"start"' in log.read_text()):
            time.sleep(0.3)
        assert log.exists(), "training never started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    end = _records(out)[-1]
    assert end["event"] == "end" and end["status"] == "stopped"
    assert (out / "last.pt").is_file() and end["last_checkpoint"] == str(out / "last.pt")
    assert "Traceback" not in stderr
