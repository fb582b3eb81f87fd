"""Launching and watching a ``training`` run from the GUI, without Qt.

The Training dock widget starts ``python -m training train ...`` as a *separate process* (so a
crash or a CUDA out-of-memory error cannot take napari down, and GPU memory is returned to the
system when it ends).  This module holds the parts that need no Qt: turning the form into a
command line, reading the metrics log the trainer appends to (``metrics.jsonl``, format in
``docs/ARCHITECTURE.md``) incrementally, and estimating the time left.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

PHANTOM = "phantom"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainingRequest:
    """What the user asked for in the Training widget (each field maps to one CLI flag)."""

    network: str
    data: str  # a folder, or "phantom"
    out_dir: str
    target: str = "both"  # lung | infection | both
    epochs: Optional[int] = None  # None: the paper's recipe
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    input_size: Optional[Sequence[int]] = None
    val_fraction: Optional[float] = 0.2
    folds: Optional[int] = None
    fold: Optional[int] = None
    device: str = "auto"
    resume: Optional[str] = None  # a checkpoint path
    init_from: Optional[str] = None  # a checkpoint path or "shipped"
    seed: int = 0
    small_network: bool = False  # use the network's shipped (small) constructor arguments
    extra_args: List[str] = field(default_factory=list)

    def validate(self) -> None:
        from .errors import InputError

        if not self.out_dir:
            raise InputError("Choose an output folder for the checkpoints and logs.")
        if self.data != PHANTOM and (not str(self.data).strip() or not Path(self.data).is_dir()):
            raise InputError(f"The data folder {self.data!r} does not exist. Choose a folder with CT and mask NIfTI files, or the built-in phantom.")
        if self.target not in ("lung", "infection", "both"):
            raise InputError(f"Unknown target {self.target!r}: use lung, infection or both.")
        if self.folds is not None and (self.fold is None or not 0 <= self.fold < self.folds):
            raise InputError(f"Fold must be between 0 and {self.folds - 1} when using {self.folds} folds.")
        if self.resume and not Path(self.resume).is_file():
            raise InputError(f"The checkpoint to resume from, {self.resume!r}, does not exist.")
        if self.resume and self.init_from:
            raise InputError("Choose either resume (continue a run) or fine-tune (start from weights), not both.")

    def command(self, python: str = sys.executable) -> List[str]:
        """The exact command line that runs this training."""
        cmd = [python, "-u", "-m", "training", "train", "--network", self.network, "--data", self.data,
               "--out", self.out_dir, "--target", self.target, "--device", self.device, "--seed", str(self.seed)]
        if self.epochs is not None:
            cmd += ["--epochs", str(int(self.epochs))]
        if self.batch_size is not None:
            cmd += ["--batch-size", str(int(self.batch_size))]
        if self.lr is not None:
            cmd += ["--lr", repr(float(self.lr))]
        if self.input_size:
            cmd += ["--input-size", *[str(int(s)) for s in self.input_size]]
        if self.folds is not None:
            cmd += ["--folds", str(int(self.folds)), "--fold", str(int(self.fold))]
        elif self.val_fraction is not None:
            cmd += ["--val-fraction", repr(float(self.val_fraction))]
        if self.resume:
            cmd += ["--resume", self.resume]
        if self.init_from:
            cmd += ["--init-from", self.init_from]
        if self.small_network:
            cmd += ["--net-kwargs-shipped"]
        return cmd + list(self.extra_args)


def child_environment() -> dict:
    """Environment for the training process: unbuffered output, package importable from here."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class MetricsTail:
    """Reads the records appended to a ``metrics.jsonl`` since the last call.

    A line is consumed only once it is complete (ends with a newline), so a record the trainer is
    still writing is never half-parsed; lines that are not JSON are skipped.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.records: List[dict] = []

    def reset(self) -> None:
        self._offset, self._partial, self.records = 0, b"", []

    def poll(self) -> List[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            try:
                rec = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                new.append(rec)
        self.records.extend(new)
        return new

    @property
    def epochs(self) -> List[dict]:
        return [r for r in self.records if r.get("event") == "epoch"]

    @property
    def end(self) -> Optional[dict]:
        ends = [r for r in self.records if r.get("event") == "end"]
        return ends[-1] if ends else None


def eta_seconds(epoch_records: Sequence[dict], total_epochs: int) -> Optional[float]:
    """Time left, from the mean duration of the epochs of this session (None before the first)."""
    timed = [r["seconds"] for r in epoch_records if isinstance(r.get("seconds"), (int, float))]
    if not timed or not epoch_records:
        return None
    done = int(epoch_records[-1].get("epoch", len(epoch_records)))
    recent = timed[-5:]
    return max(0, total_epochs - done) * (sum(recent) / len(recent))


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plain_failure_message(end_record: Optional[dict], exit_code: Optional[int], log_tail: Sequence[str]) -> str:
    """A sentence a user can act on, from the trainer's end record or, failing that, its output."""
    text = (end_record or {}).get("error") or ""
    blob = (text + "\n" + "\n".join(log_tail)).lower()
    if "out of memory" in blob:
        return ("The GPU ran out of memory. Lower the batch size or the input size, or train on the CPU. "
                + (text or ""))
    if "cuda" in blob and ("not available" in blob or "no cuda" in blob or "missing" in blob):
        return "CUDA was requested but no usable NVIDIA GPU was found. Choose 'cpu' or 'auto' as device. " + (text or "")
    if text:
        return text
    # no end record (e.g. bad arguments): the CLI's own one-line "error: ..." is the best reason
    for line in reversed(list(log_tail)):
        if line.strip().lower().startswith("error:"):
            return line.strip()[len("error:"):].strip()
    if exit_code is not None and exit_code < 0:
        return f"The training process was killed (signal {-exit_code})."
    return f"The training process stopped with exit code {exit_code}. See the last log lines below."
