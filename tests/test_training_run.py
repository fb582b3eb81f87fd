"""The Qt-free half of the Training widget: command line, metrics-log tail, ETA, failure text."""

import json
import sys

import pytest

from napari_covidseg.errors import InputError
from napari_covidseg.training_run import (
    MetricsTail,
    TrainingRequest,
    eta_seconds,
    format_duration,
    last_lines,
    plain_failure_message,
)


def test_command_carries_every_form_field(tmp_path):
    req = TrainingRequest(network="unet", data="phantom", out_dir=str(tmp_path), target="infection", epochs=3,
                          batch_size=2, lr=5e-4, input_size=(128, 128), val_fraction=0.25, device="cpu",
                          init_from="shipped", small_network=True, seed=7)
    req.validate()
    cmd = req.command(python="py")
    assert cmd[:5] == ["py", "-u", "-m", "training", "train"]
    joined = " ".join(cmd)
    for part in ("--network unet", "--data phantom", f"--out {tmp_path}", "--target infection", "--epochs 3",
                 "--batch-size 2", "--lr 0.0005", "--input-size 128 128", "--val-fraction 0.25", "--device cpu",
                 "--init-from shipped", "--net-kwargs-shipped", "--seed 7"):
        assert part in joined


def test_kfold_replaces_val_fraction(tmp_path):
    req = TrainingRequest(network="unet", data="phantom", out_dir=str(tmp_path), folds=5, fold=2)
    cmd = " ".join(req.command(python="py"))
    assert "--folds 5 --fold 2" in cmd and "--val-fraction" not in cmd


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"data": "/no/such/folder"}, "does not exist"),
        ({"out_dir": ""}, "output folder"),
        ({"folds": 5, "fold": 5}, "between 0 and 4"),
        ({"resume": "/no/such.pt"}, "resume"),
        ({"target": "heart"}, "Unknown target"),
    ],
)
def test_bad_requests_say_what_to_fix(tmp_path, kwargs, words):
    base = dict(network="unet", data="phantom", out_dir=str(tmp_path))
    base.update(kwargs)
    with pytest.raises(InputError, match=words):
        TrainingRequest(**base).validate()


def test_metrics_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == []  # file not there yet
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "epochs": 4}) + "\n")
        f.write(json.dumps({"event": "epoch", "epoch": 1, "seconds": 10.0}) + "\n")
        f.write('{"event": "epoch", "epo')  # being written
    new = tail.poll()
    assert [r["event"] for r in new] == ["start", "epoch"]
    with open(path, "a") as f:
        f.write('ch": 2, "seconds": 20.0}\nnot json\n')
    new = tail.poll()
    assert new == [{"event": "epoch", "epoch": 2, "seconds": 20.0}]
    assert [r["epoch"] for r in tail.epochs] == [1, 2]
    assert tail.end is None
    with open(path, "a") as f:
        f.write(json.dumps({"event": "end", "status": "stopped"}) + "\n")
    tail.poll()
    assert tail.end["status"] == "stopped"


def test_eta_uses_recent_epoch_durations():
    recs = [{"event": "epoch", "epoch": i, "seconds": 10.0} for i in range(1, 4)]
    assert eta_seconds(recs, 10) == pytest.approx(70.0)
    assert eta_seconds([], 10) is None
    assert format_duration(70) == "1:10" and format_duration(3725) == "1:02:05" and format_duration(None) == "--"


def test_failure_messages_are_plain_words(tmp_path):
    oom = plain_failure_message({"error": "CUDA out of memory. Tried to allocate 2 GiB"}, 1, [])
    assert "ran out of memory" in oom and "batch size" in oom
    assert "killed" in plain_failure_message(None, -9, [])
    log = tmp_path / "train.log"
    log.write_text("\n".join(f"line {i}" for i in range(50)))
    assert last_lines(log, 3) == ["line 47", "line 48", "line 49"]
    assert last_lines(tmp_path / "missing.log") == []
