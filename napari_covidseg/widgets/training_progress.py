"""The Train widget's view of a run: curves and log (the "Progress" tab), the epoch bar with its
ETA, and a bar for the epoch under way.

The trainer writes one ``metrics.jsonl`` record per *epoch* (``docs/ARCHITECTURE.md``), so on a
CPU, where an epoch takes minutes, nothing would move in between.  The bar for the epoch under
way therefore shows, in order of preference:

* the trainer's own ``{"event": "step", "epoch": k, "step": s, "steps": n}`` records, when a
  trainer writes them (exact);
* otherwise an estimate: time since the previous epoch ended over the mean duration of this
  run's epochs so far, labelled "estimated" and capped at 99 %;
* before the first epoch has ended, nothing but a busy bar (no honest estimate exists).
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

from qtpy.QtCore import QObject, Qt
from qtpy.QtWidgets import QPlainTextEdit, QProgressBar, QSplitter

from ..training_run import eta_seconds, format_duration
from .metrics_plot import TrainingPlot


def per_class_dice(record: dict) -> str:
    """``lung 0.910, infection 0.564`` from an epoch record's validation block (a mean hides a
    failing class)."""
    val = record.get("val") or {}
    parts = [f"{cls} {float(val[cls]['dice']):.3f}" for cls in ("lung", "infection")
             if isinstance(val.get(cls), dict) and isinstance(val[cls].get("dice"), (int, float))]
    if parts:
        return ", ".join(parts)
    mean = record.get("val_dice_mean")
    return f"mean {mean:.3f}" if isinstance(mean, (int, float)) else ""


def within_epoch(step_record: Optional[dict], seconds_in: Optional[float], epoch_seconds: Sequence[float]):
    """(percent, exact) for the epoch under way, or None when nothing honest can be said."""
    if step_record and isinstance(step_record.get("steps"), int) and step_record["steps"] > 0:
        return min(100, int(100 * int(step_record.get("step", 0)) / step_record["steps"])), True
    if seconds_in is None or not epoch_seconds:
        return None
    recent = list(epoch_seconds)[-5:]
    return min(99, int(100 * seconds_in / (sum(recent) / len(recent)))), False


class TrainingProgress(QObject):
    """Owns the plot, the log and both bars; fed with metrics records by the Train widget."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.plot = TrainingPlot()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(3000)
        self.log_view.setPlaceholderText("Training output appears here.")
        self.log_view.setMinimumHeight(50)
        self.page = QSplitter(Qt.Vertical)
        self.page.addWidget(self.plot)
        self.page.addWidget(self.log_view)
        self.page.setStretchFactor(0, 3)
        self.page.setStretchFactor(1, 1)
        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        self.progress.setValue(0)
        self.step_bar = QProgressBar()
        self.step_bar.setToolTip("The epoch under way: from the trainer's step records where it writes them, "
                                 "else estimated from how long this run's epochs took")
        self.step_bar.setVisible(False)
        self.total_epochs = 0
        self._epoch_began: Optional[float] = None  # when the epoch under way began (as seen here)
        self._current_epoch = 0
        self._last_step: Optional[dict] = None
        self._session_seconds: List[float] = []

    # --- state ---------------------------------------------------------------------------------
    def set_total(self, epochs: int, done: int = 0) -> None:
        """A run of ``epochs`` epochs, ``done`` of them finished (also when the form changes)."""
        self.total_epochs = int(epochs)
        self.progress.setRange(0, max(1, self.total_epochs))
        self.progress.setValue(min(int(done), max(1, self.total_epochs)))
        self.progress.setFormat("epoch %v / %m")

    def begin(self, epochs: int, epoch_records: Sequence[dict]) -> None:
        """A run (or a resumed one) starts; earlier epochs stay on the plot."""
        self.set_total(epochs, int(epoch_records[-1].get("epoch", 0)) if epoch_records else 0)
        self.plot.set_records(list(epoch_records))
        self._session_seconds = []
        self._last_step = None
        self._epoch_began = None
        self._current_epoch = self.progress.value() + 1
        self.step_bar.setVisible(True)
        self.step_bar.setRange(0, 0)  # busy until something is known
        self.step_bar.setFormat("")

    def end(self) -> None:
        self.step_bar.setVisible(False)
        self.progress.setFormat("epoch %v / %m")

    # --- records -------------------------------------------------------------------------------
    def take(self, new: Sequence[dict], epoch_records: Sequence[dict], session_epochs: Sequence[dict],
             now: Optional[float] = None) -> Optional[str]:
        """Show ``new`` records; returns a status line when an epoch ended (else None)."""
        now = time.time() if now is None else now
        for rec in new:
            if rec.get("event") in ("start", "epoch") and rec.get("epochs"):
                self.set_total(int(rec["epochs"]), self.progress.value())
            if rec.get("event") == "start":
                self._epoch_began = now
                self._current_epoch = int(rec.get("resumed_from_epoch") or 0) + 1
            elif rec.get("event") == "step":
                self._last_step = rec
            elif rec.get("event") == "epoch":
                self.progress.setValue(int(rec.get("epoch", 0)))
                if isinstance(rec.get("seconds"), (int, float)):
                    self._session_seconds.append(float(rec["seconds"]))
                self._epoch_began, self._current_epoch, self._last_step = now, int(rec.get("epoch", 0)) + 1, None
        if not any(r.get("event") == "epoch" for r in new):
            return None
        self.plot.set_records(list(epoch_records))
        last = epoch_records[-1]
        eta = format_duration(eta_seconds(list(session_epochs) or list(epoch_records), self.total_epochs))
        self.progress.setFormat(f"epoch %v / %m   ETA {eta}")
        dice = per_class_dice(last)
        return (f"Epoch {last.get('epoch')}/{self.total_epochs} done" + (f": val Dice {dice}" if dice else "")
                + f" on {last.get('device', '?')}; ETA {eta}")

    def tick(self, now: Optional[float] = None) -> None:
        """Move the bar of the epoch under way (called by the widget's poll timer)."""
        if not self.step_bar.isVisible() or self._current_epoch > max(1, self.total_epochs):
            return
        now = time.time() if now is None else now
        seconds_in = None if self._epoch_began is None else now - self._epoch_began
        step = self._last_step if (self._last_step or {}).get("epoch") == self._current_epoch else None
        shown = within_epoch(step, seconds_in, self._session_seconds)
        if shown is None:
            self.step_bar.setRange(0, 0)
            self.step_bar.setFormat("")
            return
        percent, exact = shown
        self.step_bar.setRange(0, 100)
        self.step_bar.setValue(percent)
        self.step_bar.setFormat(f"epoch {self._current_epoch}: {percent}%" + ("" if exact else " (estimated)"))

    def log(self, text: str) -> None:
        self.log_view.appendPlainText(text)
