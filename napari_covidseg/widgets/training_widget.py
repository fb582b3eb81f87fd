"""Training dock widget: launch and watch a ``training`` run without leaving napari.

Training runs as a separate process (``python -m training train ...`` through ``QProcess``), so a
crash or CUDA out-of-memory error cannot take napari down and GPU memory is freed when it ends.
The widget tails the run's ``metrics.jsonl`` for the live plot, progress bar and ETA; Stop sends
SIGTERM, which the trainer answers by writing ``last.pt`` and exiting cleanly; Resume restarts
from that checkpoint.  A finished run's best checkpoint is added to the weights catalog, so the
Segment widget can use it at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import CovidsegError
from ..models import get_network, network_names
from ..training_run import (
    METRICS_FILE,
    PHANTOM,
    TEXT_LOG_FILE,
    MetricsTail,
    TrainingRequest,
    child_environment,
    eta_seconds,
    format_duration,
    last_lines,
    plain_failure_message,
)
from .common import device_choices, notify_error
from .metrics_plot import TrainingPlot

GRACE_MS = 60_000  # how long Stop waits for the checkpoint before killing the process


class TrainingWidget(QWidget):
    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.process: Optional[QProcess] = None
        self.check_process: Optional[QProcess] = None
        self.tail: Optional[MetricsTail] = None
        self.total_epochs = 0
        self.last_request: Optional[TrainingRequest] = None
        self.finished_checkpoint: Optional[str] = None
        self._stop_requested = False

        self._build_form()
        self._build_run_controls()
        self.poll_timer = QTimer(self)
        self.poll_timer.setInterval(500)
        self.poll_timer.timeout.connect(self.poll_metrics)
        self._network_changed()
        self._update_buttons()

    # ------------------------------------------------------------------ form
    def _build_form(self):
        layout = QVBoxLayout(self)
        box = QGroupBox("Training run")
        form = QFormLayout(box)

        self.network_combo = QComboBox()
        for name in network_names():
            self.network_combo.addItem(f"{get_network(name).title}  [{name}]", name)
        self.network_combo.currentIndexChanged.connect(self._network_changed)
        form.addRow("Network", self.network_combo)

        self.phantom_check = QCheckBox("Built-in phantom (synthetic CT)")
        self.phantom_check.setChecked(True)
        self.phantom_check.toggled.connect(self._data_source_changed)
        form.addRow("Data", self.phantom_check)
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("folder with CT and masks (COVID-19-CT-Seg, MedSeg or images/lung/infection)")
        self.data_browse = QPushButton("Browse...")
        self.data_browse.clicked.connect(lambda: self._browse_dir(self.data_edit))
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Count the cases and labels found in the folder before starting")
        self.check_button.clicked.connect(self.check_data)
        row = QHBoxLayout()
        row.addWidget(self.data_edit, 1)
        row.addWidget(self.data_browse)
        row.addWidget(self.check_button)
        form.addRow("Folder", row)
        self.check_label = QLabel("")
        self.check_label.setWordWrap(True)
        form.addRow("", self.check_label)

        self.target_combo = QComboBox()
        self.target_combo.addItems(["both", "lung", "infection"])
        form.addRow("Target", self.target_combo)

        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 10000)
        form.addRow("Epochs", self.epochs_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        form.addRow("Batch size", self.batch_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        form.addRow("Learning rate", self.lr_spin)
        self.size_edit = QLineEdit()
        self.size_edit.setToolTip("Input size: H W for 2D networks, D H W (patch) for 3D networks")
        form.addRow("Input size", self.size_edit)

        self.split_combo = QComboBox()
        self.split_combo.addItems(["hold-out fraction", "k-fold"])
        self.split_combo.currentIndexChanged.connect(self._split_changed)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.05, 0.5)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setValue(0.2)
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(2, 20)
        self.folds_spin.setValue(5)
        self.fold_spin = QSpinBox()
        self.fold_spin.setRange(0, 19)
        split_row = QHBoxLayout()
        split_row.addWidget(self.split_combo)
        split_row.addWidget(self.val_spin)
        split_row.addWidget(QLabel("folds"))
        split_row.addWidget(self.folds_spin)
        split_row.addWidget(QLabel("fold"))
        split_row.addWidget(self.fold_spin)
        form.addRow("Validation", split_row)

        self.out_edit = QLineEdit(str(Path.home() / "covidseg-runs" / "run"))
        out_browse = QPushButton("Browse...")
        out_browse.clicked.connect(lambda: self._browse_dir(self.out_edit))
        row = QHBoxLayout()
        row.addWidget(self.out_edit, 1)
        row.addWidget(out_browse)
        form.addRow("Output folder", row)

        self.device_combo = QComboBox()
        for label, value in device_choices():
            self.device_combo.addItem(label, value)
        form.addRow("Device", self.device_combo)

        self.resume_edit = QLineEdit()
        self.resume_edit.setPlaceholderText("optional: last.pt of an earlier run")
        resume_browse = QPushButton("Browse...")
        resume_browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self.resume_edit, 1)
        row.addWidget(resume_browse)
        form.addRow("Resume from", row)

        self.finetune_check = QCheckBox("Fine-tune from the shipped weights")
        form.addRow("", self.finetune_check)
        self.small_check = QCheckBox("Small network (the shipped variant's size)")
        self.small_check.setToolTip("Use the network's shipped constructor arguments: much faster on a CPU")
        form.addRow("", self.small_check)
        layout.addWidget(box)
        self._layout = layout
        self._data_source_changed(True)
        self._split_changed()

    def _build_run_controls(self):
        layout = self._layout
        row = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; a checkpoint is written")
        self.stop_button.clicked.connect(self.stop)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last run from its last checkpoint")
        self.resume_button.clicked.connect(self.resume)
        for b in (self.start_button, self.stop_button, self.resume_button):
            row.addWidget(b)
        layout.addLayout(row)

        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        layout.addWidget(self.progress)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

        self.plot = TrainingPlot(self)
        layout.addWidget(self.plot, 1)

        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(3000)
        self.log_view.setPlaceholderText("Training output appears here.")
        layout.addWidget(self.log_view, 1)

    # --------------------------------------------------------------- helpers
    def _network_changed(self, *_):
        spec = get_network(self.network_combo.currentData())
        recipe = spec.recipe
        self.epochs_spin.setValue(int(recipe.epochs))
        self.batch_spin.setValue(int(recipe.batch_size))
        self.lr_spin.setValue(float(recipe.lr))
        self.size_edit.setText(" ".join(str(int(s)) for s in recipe.input_size))
        self.setToolTip(spec.paper)

    def _data_source_changed(self, phantom: bool):
        for w in (self.data_edit, self.data_browse, self.check_button):
            w.setEnabled(not phantom)
        self.check_label.setText("The built-in phantom: synthetic chest CTs with lung and infection masks." if phantom else "")

    def _split_changed(self, *_):
        kfold = self.split_combo.currentIndex() == 1
        self.val_spin.setVisible(not kfold)
        self.folds_spin.setEnabled(kfold)
        self.fold_spin.setEnabled(kfold)

    def _browse_dir(self, edit: QLineEdit):
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or str(Path.home()))
        if path:
            edit.setText(path)

    def _browse_checkpoint(self):
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint to resume", str(Path.home()), "Checkpoints (*.pt)")
        if path:
            self.resume_edit.setText(path)

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.NotRunning

    def _update_buttons(self):
        running = self.is_running()
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        out = Path(self.out_edit.text()) if self.out_edit.text() else None
        self.resume_button.setEnabled(not running and out is not None and (out / "last.pt").is_file())

    def request(self) -> TrainingRequest:
        """The form as a :class:`TrainingRequest` (raises ``InputError`` on bad values)."""
        from ..errors import InputError

        try:
            size = [int(s) for s in self.size_edit.text().replace(",", " ").replace("x", " ").split()]
        except ValueError:
            raise InputError(f"Input size {self.size_edit.text()!r} is not a list of integers, e.g. '256 256'.") from None
        spec = get_network(self.network_combo.currentData())
        if len(size) != spec.dims:
            raise InputError(f"{spec.name} is a {spec.dims}D network: give {spec.dims} numbers as input size.")
        kfold = self.split_combo.currentIndex() == 1
        return TrainingRequest(
            network=spec.name,
            data=PHANTOM if self.phantom_check.isChecked() else self.data_edit.text().strip(),
            out_dir=self.out_edit.text().strip(),
            target=self.target_combo.currentText(),
            epochs=self.epochs_spin.value(),
            batch_size=self.batch_spin.value(),
            lr=self.lr_spin.value(),
            input_size=size,
            val_fraction=None if kfold else self.val_spin.value(),
            folds=self.folds_spin.value() if kfold else None,
            fold=self.fold_spin.value() if kfold else None,
            device=self.device_combo.currentData(),
            resume=self.resume_edit.text().strip() or None,
            init_from="shipped" if self.finetune_check.isChecked() else None,
            small_network=self.small_check.isChecked(),
        )

    # ------------------------------------------------------------ check data
    def check_data(self):
        folder = self.data_edit.text().strip()
        if not folder:
            notify_error("Choose a data folder first.")
            return
        self.check_label.setText("Checking...")
        proc = QProcess(self)
        proc.setProcessEnvironment(self._environment())
        proc.setProcessChannelMode(QProcess.SeparateChannels)
        proc.finished.connect(lambda code, _status: self._check_finished(proc, code))
        proc.start(sys.executable, ["-m", "training", "check-data", folder])
        self.check_process = proc

    def _check_finished(self, proc: QProcess, code: int):
        out = bytes(proc.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(proc.readAllStandardError()).decode("utf-8", "replace").strip()
        if code != 0:
            self.check_label.setText("Problem: " + (err.splitlines()[-1] if err else f"exit code {code}"))
            return
        try:
            report = json.loads(out)
        except ValueError:
            self.check_label.setText(out.strip()[:500])
            return
        self.check_label.setText(summarise_data_report(report))

    # ------------------------------------------------------------ run control
    def _environment(self) -> QProcessEnvironment:
        env = QProcessEnvironment()
        for key, value in child_environment().items():
            env.insert(key, value)
        return env

    def start(self, request: Optional[TrainingRequest] = None):
        if self.is_running():
            return
        try:
            request = request or self.request()
            request.validate()
            Path(request.out_dir).mkdir(parents=True, exist_ok=True)
        except CovidsegError as exc:
            notify_error(exc)
            self.status_label.setText(str(exc))
            return
        except OSError as exc:
            notify_error(f"Cannot create the output folder: {exc}")
            return
        self.last_request = request
        self.finished_checkpoint = None
        self._stop_requested = False
        metrics_path = Path(request.out_dir) / METRICS_FILE
        if request.resume is None and metrics_path.exists():
            # a new run in a used folder: keep the old log, start the plot afresh
            metrics_path.rename(metrics_path.with_suffix(f".{int(metrics_path.stat().st_mtime)}.jsonl"))
        self.tail = MetricsTail(metrics_path)
        self.total_epochs = int(request.epochs or 0)
        self.progress.setRange(0, max(1, self.total_epochs))
        self.progress.setValue(0)
        self.plot.clear()
        cmd = request.command()
        self.log_view.appendPlainText("$ " + " ".join(cmd))

        proc = QProcess(self)
        proc.setProcessEnvironment(self._environment())
        proc.setProcessChannelMode(QProcess.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read_output)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._process_error)
        self.process = proc
        proc.start(cmd[0], cmd[1:])
        self.poll_timer.start()
        self.status_label.setText(f"Training {request.network} on {request.data} ...")
        self._update_buttons()

    def stop(self):
        if not self.is_running():
            return
        self._stop_requested = True
        self.status_label.setText("Stopping: finishing the current step and writing a checkpoint ...")
        self.process.terminate()  # SIGTERM: the trainer checkpoints and exits
        QTimer.singleShot(GRACE_MS, self._kill_if_still_running)

    def _kill_if_still_running(self):
        if self.is_running():
            self.log_view.appendPlainText("[napari-covidseg] the trainer did not stop in time; killing it")
            self.process.kill()

    def resume(self):
        if self.is_running():
            return
        try:
            request = self.last_request or self.request()
        except CovidsegError as exc:
            notify_error(exc)
            return
        last = Path(request.out_dir) / "last.pt"
        if not last.is_file():
            notify_error(f"There is no checkpoint to resume from in {request.out_dir}.")
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
            self.log_view.appendPlainText(text.rstrip("\n"))

    def poll_metrics(self):
        if self.tail is None:
            return
        new = self.tail.poll()
        if not new:
            return
        epochs = self.tail.epochs
        for rec in new:
            if rec.get("event") == "start" and rec.get("epochs"):
                self.total_epochs = int(rec["epochs"])
                self.progress.setRange(0, self.total_epochs)
            elif rec.get("event") == "epoch":
                self.total_epochs = int(rec.get("epochs", self.total_epochs))
                self.progress.setRange(0, max(1, self.total_epochs))
                self.progress.setValue(int(rec.get("epoch", 0)))
        if epochs:
            self.plot.set_records(epochs)
            last = epochs[-1]
            eta = format_duration(eta_seconds(epochs, self.total_epochs))
            dice = last.get("val_dice_mean")
            dice_txt = f", val Dice {dice:.3f}" if isinstance(dice, (int, float)) else ""
            self.status_label.setText(
                f"Epoch {last.get('epoch')}/{self.total_epochs}{dice_txt} on {last.get('device', '?')}; ETA {eta}")

    def _process_error(self, error):
        if error == QProcess.FailedToStart:
            self.status_label.setText("The training process could not be started.")
            notify_error("The training process could not be started (is the Python environment complete?).")

    def _finished(self, exit_code: int, _exit_status=None):
        self._read_output()
        self.poll_metrics()
        self.poll_timer.stop()
        request = self.last_request
        out = Path(request.out_dir) if request else None
        end = self.tail.end if self.tail else None
        status = (end or {}).get("status")
        if status in ("finished", "stopped") or (self._stop_requested and exit_code == 0):
            best = (end or {}).get("best_checkpoint") or (str(out / "best.pt") if out else None)
            if best and Path(best).is_file():
                self.finished_checkpoint = best
                self._offer_checkpoint(best)
            verb = "stopped" if status == "stopped" or self._stop_requested else "finished"
            self.status_label.setText(
                f"Training {verb}. Best checkpoint: {best or 'none yet'}"
                + (" (available in the Segment widget)." if self.finished_checkpoint else "."))
        else:
            tail_lines = last_lines(out / TEXT_LOG_FILE, 12) if out else []
            if not tail_lines:
                tail_lines = self.log_view.toPlainText().splitlines()[-12:]
            message = plain_failure_message(end, exit_code, tail_lines)
            self.status_label.setText("Training failed: " + message)
            self.log_view.appendPlainText("---- last log lines ----\n" + "\n".join(tail_lines))
            notify_error("Training failed: " + message)
        self._update_buttons()

    def _offer_checkpoint(self, path: str):
        from .. import weights_catalog

        try:
            weights_catalog.add_checkpoint(path)
        except CovidsegError as exc:
            notify_error(exc)

    def closeEvent(self, event):  # noqa: N802 (Qt name)
        if self.is_running():
            self.process.terminate()
            self.process.waitForFinished(GRACE_MS)
        super().closeEvent(event)


def summarise_data_report(report: dict) -> str:
    """One line from ``python -m training check-data``'s JSON report."""
    layout = report.get("layout", "?")
    cases = report.get("cases")
    n = report.get("n_cases", len(cases) if isinstance(cases, list) else "?")
    labels = report.get("labels") or report.get("labels_found")
    parts = [f"{n} cases found ({layout} layout)"]
    if isinstance(labels, dict):
        parts.append(", ".join(f"{k}: {v}" for k, v in labels.items()))
    elif isinstance(labels, (list, tuple)):
        parts.append("labels: " + ", ".join(map(str, labels)))
    problems = report.get("problems") or []
    if problems:
        parts.append(f"{len(problems)} problem(s): " + "; ".join(map(str, problems[:3])))
    return ". ".join(parts)
