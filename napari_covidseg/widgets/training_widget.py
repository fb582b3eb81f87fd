"""Training dock widget: launch and watch a ``training`` run without leaving napari.

Training runs as a separate process (``python -m training train ...`` through ``QProcess``), so a
crash or CUDA out-of-memory error cannot take napari down and GPU memory is freed when it ends.
Before a run on a data folder starts, the folder is checked (``check-data``, in a child process
too) and a folder without usable cases is refused at once.  The widget tails the run's
``metrics.jsonl`` for the live plot, progress bars and ETA; Stop sends SIGTERM, which the trainer
answers by writing ``last.pt`` and exiting cleanly; Resume restarts from that checkpoint.  A
finished (or stopped) run's best checkpoint is added to the weights catalog, so the Segment widget
lists it at once, named with its per-class validation Dice.

This module is the process control; the form is :mod:`training_form`, the data check
:mod:`training_data_check` and the plot, log and bars :mod:`training_progress`.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from qtpy.QtCore import QProcess, Qt, QTimer
from qtpy.QtWidgets import QApplication, QHBoxLayout, QLabel, QTabWidget, QVBoxLayout, QWidget

from ..errors import CovidsegError, InputError
from ..training_run import METRICS_FILE, PHANTOM, MetricsTail, TrainingRequest, plain_failure_message
from .common import notify_error, push_button, scrolled
from .training_data_check import DataCheck, environment, summarise_data_report  # noqa: F401 (API)
from .training_form import TrainingForm, default_out_dir, parse_extra_args  # noqa: F401 (API)
from .training_progress import TrainingProgress, per_class_dice

GRACE_MS = 60_000  # how long Stop waits for the checkpoint before killing the process
FAILURE_LINES = 6  # log lines quoted in the status label when a run fails
_LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
#: the form's fields, also reachable as attributes of the widget (scripts and tests use them)
FORM_FIELDS = ("network_combo", "phantom_check", "data_edit", "check_button", "check_label", "target_combo",
               "epochs_spin", "batch_spin", "lr_spin", "size_edit", "split_combo", "val_spin", "folds_spin",
               "fold_spin", "out_edit", "device_combo", "resume_edit", "finetune_check", "small_check", "extra_edit",
               "quick_button", "set_network", "set_device", "new_out_dir", "request")


class TrainingWidget(QWidget):
    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.process: Optional[QProcess] = None
        self.tail: Optional[MetricsTail] = None
        self.last_request: Optional[TrainingRequest] = None
        self.finished_checkpoint: Optional[str] = None
        self.last_status: Optional[str] = None  # finished | stopped | failed, once a run has ended
        self._stop_requested = False
        self._pending: Optional[TrainingRequest] = None  # waits for its data check
        self._session_first_record = 0  # metrics records before this index belong to earlier sessions
        self._session_output: List[str] = []

        self.form = self.setup_page = TrainingForm()
        for name in FORM_FIELDS:
            setattr(self, name, getattr(self.form, name))
        self.view = TrainingProgress(self)
        self.plot, self.log_view, self.progress = self.view.plot, self.view.log_view, self.view.progress
        self.data_check = DataCheck(self)
        self.data_check.finished.connect(self._data_checked)
        self.form.check_requested.connect(self.check_data)
        self.form.epochs_spin.valueChanged.connect(self._epochs_changed)
        self.tabs = QTabWidget()
        self.tabs.addTab(scrolled(self.form), "Setup")
        self.tabs.addTab(self.view.page, "Progress")
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        self._build_run_controls(layout)

        self.poll_timer = QTimer(self)
        self.poll_timer.setInterval(500)
        self.poll_timer.timeout.connect(self.poll_metrics)
        self.out_edit.textChanged.connect(self._update_buttons)
        self._epochs_changed()
        self._update_buttons()
        app = QApplication.instance()
        if app is not None:  # napari quitting: let the trainer write its checkpoint first
            app.aboutToQuit.connect(self._on_quit)

    def _on_quit(self):
        self.shutdown(timeout_ms=20_000)

    def _build_run_controls(self, layout: QVBoxLayout):
        self.start_button = push_button("Start", "Check the data, then start a new training run with these settings",
                                        lambda: self.start())
        self.stop_button = push_button("Stop", "Stop after the current step; last.pt is written so the run can be resumed",
                                       self.stop)
        self.resume_button = push_button("Resume", "Continue the run in the output folder from its last.pt",
                                         self.resume)
        row = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button):
            row.addWidget(b)
        layout.addLayout(row)
        layout.addWidget(self.view.progress)
        layout.addWidget(self.view.step_bar)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status_label)

    # --------------------------------------------------------------- state
    def is_running(self) -> bool:
        """A trainer runs, or a run waits for its data check."""
        trainer = self.process is not None and self.process.state() != QProcess.NotRunning
        return trainer or self._pending is not None

    def _update_buttons(self, *_):
        running = self.is_running()
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.setup_page.setEnabled(not running)  # the running process keeps the settings it started with
        out = self.out_edit.text().strip()
        self.resume_button.setEnabled(not running and bool(out) and (Path(out) / "last.pt").is_file())

    def _epochs_changed(self, *_):
        """A new epoch count in the form: the bar shows it (never a finished run's stale count)."""
        if not self.is_running():
            self.view.set_total(self.epochs_spin.value(), 0)

    # ------------------------------------------------------------ check data
    def check_data(self):
        folder = self.data_edit.text().strip()
        if not folder:
            self.form.show_check("Choose a data folder first.")
            return
        self.form.show_check("Checking...")
        self.check_button.setEnabled(False)
        self.data_check.run(folder)

    def _data_checked(self, ok: bool, text: str):
        self.check_button.setEnabled(not self.phantom_check.isChecked() and self._pending is None)
        self.form.show_check(text)
        request, self._pending = self._pending, None
        if request is None:
            return
        if ok:
            self._launch(request)
        else:
            self._fail_before_start(f"The data folder {request.data} cannot be trained on. " + text)
            self._update_buttons()

    # ------------------------------------------------------------ run control
    def _fail_before_start(self, message: str):
        notify_error(message)
        self.status_label.setText(message)

    def _checked_request(self, request: Optional[TrainingRequest]) -> Optional[TrainingRequest]:
        try:
            request = request or self.form.request()
            request.validate()
            out = Path(request.out_dir)
            if request.resume is None and (out / "last.pt").exists():
                raise InputError(f"{out} already holds a training run (last.pt). Press Resume to continue it, "
                                 "or New (next to Output) for a new run in a fresh folder.")
            out.mkdir(parents=True, exist_ok=True)
        except CovidsegError as exc:
            self._fail_before_start(str(exc))
            return None
        except OSError as exc:
            self._fail_before_start(f"Cannot create the output folder {request.out_dir}: {exc.strerror or exc}.")
            return None
        return request

    def start(self, request: Optional[TrainingRequest] = None):
        """Check the data folder (unless checked and unchanged), then launch ``python -m training train``."""
        if self.is_running():
            return
        request = self._checked_request(request)
        if request is None:
            return
        if request.data != PHANTOM and self.data_check.passed_before(request.data) is None:
            self._pending = request
            self.status_label.setText(f"Checking {request.data} before starting ...")
            self.form.show_check("Checking...")
            self.data_check.run(request.data)
            self._update_buttons()
            return
        self._launch(request)

    def _launch(self, request: TrainingRequest):
        out = Path(request.out_dir)
        self.last_request = request
        self.finished_checkpoint = None
        self.last_status = None
        self._stop_requested = False
        self._session_output = []
        metrics_path = out / METRICS_FILE
        if request.resume is None and metrics_path.exists():
            # a new run in a folder where an earlier one failed before its first checkpoint: keep that
            # log under another name and start the plot afresh
            metrics_path.rename(metrics_path.with_suffix(f".{int(metrics_path.stat().st_mtime)}.jsonl"))
        self.tail = MetricsTail(metrics_path)
        self.tail.poll()  # a resumed run's earlier epochs stay on the plot
        self._session_first_record = len(self.tail.records)
        self.view.begin(int(request.epochs or 0), self._epoch_records())
        cmd = request.command()
        self.view.log("$ " + " ".join(shlex.quote(c) for c in cmd))
        proc = QProcess(self)
        proc.setProcessEnvironment(environment())
        proc.setProcessChannelMode(QProcess.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read_output)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._process_error)
        self.process = proc
        proc.start(cmd[0], cmd[1:])
        self.poll_timer.start()
        verb = "Resuming" if request.resume else "Training"
        data = "the phantom" if request.data == PHANTOM else request.data
        self.status_label.setText(f"{verb} {request.network} on {data} (starting Python and loading data) ...")
        self.tabs.setCurrentIndex(1)
        self._update_buttons()

    def stop(self):
        if self._pending is not None:  # still checking the data: nothing was started
            self._pending = None
            self.status_label.setText("Not started.")
            self._update_buttons()
            return
        if not self.is_running():
            return
        self._stop_requested = True
        self.status_label.setText("Stopping: finishing the current step and writing a checkpoint ...")
        self.process.terminate()  # SIGTERM: the trainer checkpoints and exits
        QTimer.singleShot(GRACE_MS, self._kill_if_still_running)

    def _kill_if_still_running(self):
        if self.process is not None and self.process.state() != QProcess.NotRunning and self._stop_requested:
            self.view.log("[napari-covidseg] the trainer did not stop in time; killing it")
            self.process.kill()

    def resume(self):
        """Continue the run in the output folder from its ``last.pt`` (same settings as it started with)."""
        if self.is_running():
            return
        out = self.out_edit.text().strip()
        same_run = self.last_request is not None and Path(self.last_request.out_dir) == Path(out)
        try:
            request = self.last_request if same_run else self.form.request()
        except CovidsegError as exc:
            self._fail_before_start(str(exc))
            return
        last = Path(request.out_dir) / "last.pt"
        if not last.is_file():
            self._fail_before_start(f"There is no checkpoint (last.pt) to resume from in {request.out_dir}.")
            return
        request.resume = str(last)
        request.init_from = None
        self.start(request)

    # --------------------------------------------------------------- watching
    def _read_output(self):
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        if text:
            self.view.log(text.rstrip("\n"))
            self._session_output.extend(text.splitlines())
            del self._session_output[:-200]

    def _session_records(self) -> List[dict]:
        return self.tail.records[self._session_first_record:] if self.tail else []

    def _epoch_records(self) -> List[dict]:
        """One record per epoch number (the latest wins: a resumed run may redo an epoch)."""
        by_epoch = {}
        for rec in (self.tail.records if self.tail else []):
            if rec.get("event") == "epoch" and isinstance(rec.get("epoch"), int):
                by_epoch[rec["epoch"]] = rec
        return [by_epoch[k] for k in sorted(by_epoch)]

    def poll_metrics(self):
        if self.tail is None:
            return
        new = self.tail.poll()
        self.view.tick()
        if not new:
            return
        session_epochs = [r for r in self._session_records() if r.get("event") == "epoch"]
        text = self.view.take(new, self._epoch_records(), session_epochs)
        start = [r for r in new if r.get("event") == "start"]
        if start and text is None and not self._stop_requested:
            done = int(start[-1].get("resumed_from_epoch") or 0)
            text = f"Running on {start[-1].get('device', '?')}: epoch {done + 1}/{self.view.total_epochs} ..."
        if text and not self._stop_requested:
            self.status_label.setText(text)
        self.view.tick()

    def _process_error(self, error):
        if error == QProcess.FailedToStart:
            message = f"The training process could not be started ({sys.executable}); is the Python environment complete?"
            self.status_label.setText(message)
            notify_error(message)
            self.poll_timer.stop()
            self.view.end()
            self._update_buttons()

    def _finished(self, exit_code: int, _exit_status=None):
        self._read_output()
        self.poll_metrics()
        self.poll_timer.stop()
        self.view.end()
        ends = [r for r in self._session_records() if r.get("event") == "end"]
        end = ends[-1] if ends else None
        status = (end or {}).get("status")
        if end is None and self._stop_requested:  # stopped before the trainer was up: nothing to keep
            status = "stopped"
        if status in ("finished", "stopped"):
            self._report_success(status, end)
        else:
            self._report_failure(end, exit_code)
        self._update_buttons()

    def _best_checkpoint(self, end: Optional[dict]) -> Optional[str]:
        best = (end or {}).get("best_checkpoint")
        request = self.last_request
        if not best and request is not None and (Path(request.out_dir) / "best.pt").is_file():
            best = str(Path(request.out_dir) / "best.pt")
        return best if best and Path(best).is_file() else None

    def _report_success(self, status: str, end: Optional[dict]):
        best = self._best_checkpoint(end)
        if best:
            self.finished_checkpoint = best
            self._offer_checkpoint(best)
        self.last_status = status
        last = (end or {}).get("last_checkpoint")
        done = self._epoch_records()
        total = self.view.total_epochs
        epoch_txt = f" after epoch {done[-1].get('epoch')}/{total}" if done else " before the first epoch ended"
        text = f"Training {status}{epoch_txt}."
        if status == "stopped" and last:
            text += f" Checkpoint written: {last}; press Resume to continue."
        if self.finished_checkpoint:
            best_dice = per_class_dice(max(done, key=lambda r: r.get("val_dice_mean") or 0.0)) if done else ""
            text += (f" Best checkpoint {Path(self.finished_checkpoint).name}"
                     + (f" (val Dice {best_dice})" if best_dice else "") + " is listed in the Segment widget.")
        self.status_label.setText(text)

    def _report_failure(self, end: Optional[dict], exit_code: int):
        self.last_status = "failed"
        message = plain_failure_message(end, exit_code, self._session_output[-FAILURE_LINES:])
        tail_lines = [_LOG_STAMP.sub("", ln) for ln in self._session_output if ln.strip()][-FAILURE_LINES:]
        self.status_label.setText("Training failed: " + message
                                  + ("\nLast log lines:\n" + "\n".join(ln[:160] for ln in tail_lines) if tail_lines else ""))
        self.view.log("---- training failed: " + message)
        notify_error("Training failed: " + message)

    def _offer_checkpoint(self, path: str):
        from .. import weights_catalog

        try:
            weights_catalog.add_checkpoint(path)
        except CovidsegError as exc:
            notify_error(exc)
            self.finished_checkpoint = None

    def closeEvent(self, event):  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self, timeout_ms: int = GRACE_MS):
        """Stop a running trainer (checkpoint written) and wait for it, e.g. when napari closes."""
        self._pending = None
        if self.process is not None and self.process.state() != QProcess.NotRunning:
            self._stop_requested = True
            self.process.terminate()
            if not self.process.waitForFinished(timeout_ms):
                self.process.kill()
                self.process.waitForFinished(5000)
        if self.data_check.running():
            self.data_check.process.kill()
            self.data_check.process.waitForFinished(5000)
        self.poll_timer.stop()
