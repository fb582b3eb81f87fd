"""Training dock widget: launch and watch a ``training`` run without leaving napari.

Training runs as a separate process (``python -m training train ...`` through ``QProcess``), so a
crash or CUDA out-of-memory error cannot take napari down and GPU memory is freed when it ends.
The widget tails the run's ``metrics.jsonl`` for the live plot, progress bar and ETA; Stop sends
SIGTERM, which the trainer answers by writing ``last.pt`` and exiting cleanly; Resume restarts
from that checkpoint.  A finished (or stopped) run's best checkpoint is added to the weights
catalog, so the Segment widget lists it at once.

Layout: a "Setup" tab (the form, in a scroll area so it fits a normal dock width) and a
"Progress" tab (curves and log); the buttons, progress bar and status stay visible below both.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from qtpy.QtCore import QProcess, QProcessEnvironment, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
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
    QScrollArea,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..errors import CovidsegError, InputError
from ..models import get_network, network_names
from ..training_run import (
    METRICS_FILE,
    PHANTOM,
    MetricsTail,
    TrainingRequest,
    child_environment,
    eta_seconds,
    format_duration,
    plain_failure_message,
)
from .common import device_choices, notify_error
from .metrics_plot import TrainingPlot

GRACE_MS = 60_000  # how long Stop waits for the checkpoint before killing the process
FAILURE_LINES = 6  # log lines quoted in the status label when a run fails
_LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def default_out_dir(network: str) -> str:
    """A fresh folder per run, so a new run never overwrites an earlier run's checkpoints."""
    return str(Path.home() / "covidseg-runs" / f"{network}-{time.strftime('%Y%m%d-%H%M%S')}")


def parse_extra_args(text: str) -> List[str]:
    """Split the "Extra arguments" line like a shell would (quotes keep JSON in one piece)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InputError(f"Extra arguments {text!r} cannot be read ({exc}); check the quotes.") from None


def _small_button(text: str, tip: str) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    button.setMaximumWidth(button.fontMetrics().horizontalAdvance(text) + 24)
    return button


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
        self.last_status: Optional[str] = None  # finished | stopped | failed, once a run has ended
        self._stop_requested = False
        self._session_first_record = 0  # metrics records before this index belong to earlier sessions
        self._session_output: List[str] = []
        self._auto_out_dir = ""

        layout = QVBoxLayout(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_setup_tab(), "Setup")
        self.tabs.addTab(self._build_progress_tab(), "Progress")
        layout.addWidget(self.tabs, 1)
        self._build_run_controls(layout)

        self.poll_timer = QTimer(self)
        self.poll_timer.setInterval(500)
        self.poll_timer.timeout.connect(self.poll_metrics)
        self.out_edit.textChanged.connect(self._update_buttons)
        self._network_changed()
        self._data_source_changed(True)
        self._split_changed()
        self._update_buttons()
        app = QApplication.instance()
        if app is not None:  # napari quitting: let the trainer write its checkpoint first
            app.aboutToQuit.connect(self._on_quit)

    def _on_quit(self):
        self.shutdown(timeout_ms=20_000)

    # ------------------------------------------------------------------ form
    def _build_setup_tab(self) -> QWidget:
        page = QWidget()
        column = QVBoxLayout(page)
        column.setContentsMargins(2, 2, 2, 2)

        # -- network and data
        box = QGroupBox("Network and data")
        form = self._form(box)
        self.network_combo = QComboBox()
        self.network_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.network_combo.setMinimumContentsLength(12)
        for name in network_names():
            spec = get_network(name)
            self.network_combo.addItem(f"{spec.title}  [{name}]", name)
            self.network_combo.setItemData(self.network_combo.count() - 1, f"{spec.dims}D network\n{spec.paper}",
                                           Qt.ToolTipRole)
        self.network_combo.currentIndexChanged.connect(self._network_changed)
        form.addRow("Network", self.network_combo)

        self.phantom_check = QCheckBox("Built-in phantom (synthetic CT)")
        self.phantom_check.setChecked(True)
        self.phantom_check.setToolTip("Train on synthetic chest CTs with lung and infection masks (no data needed)")
        self.phantom_check.toggled.connect(self._data_source_changed)
        form.addRow("Data", self.phantom_check)
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("folder with CT and masks")
        self.data_edit.setToolTip("COVID-19-CT-Seg (Zenodo 3757476), MedSeg, or images/ + lung/ + infection/ NIfTI")
        self.data_browse = _small_button("...", "Choose the data folder")
        self.data_browse.clicked.connect(lambda: self._browse_dir(self.data_edit))
        self.check_button = _small_button("Check", "Count the cases and labels found in the folder before starting")
        self.check_button.clicked.connect(self.check_data)
        form.addRow("Folder", self._row(self.data_edit, self.data_browse, self.check_button))
        self.check_label = QLabel("")
        self.check_label.setWordWrap(True)
        self.check_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("", self.check_label)

        self.target_combo = QComboBox()
        self.target_combo.addItems(["both", "lung", "infection"])
        self.target_combo.setToolTip("Which masks the network learns (both: lung and infection outputs)")
        form.addRow("Target", self.target_combo)
        column.addWidget(box)

        # -- recipe
        box = QGroupBox("Recipe (prefilled from the paper)")
        form = self._form(box)
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
        self.split_combo.addItems(["hold-out", "k-fold"])
        self.split_combo.setToolTip("Hold out a fraction of the cases for validation, or cross-validate by folds")
        self.split_combo.currentIndexChanged.connect(self._split_changed)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.05, 0.5)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setValue(0.2)
        self.val_spin.setToolTip("Fraction of the cases used for validation")
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(2, 20)
        self.folds_spin.setValue(5)
        self.folds_spin.setPrefix("folds ")
        self.fold_spin = QSpinBox()
        self.fold_spin.setRange(0, 19)
        self.fold_spin.setPrefix("fold ")
        self.fold_spin.setToolTip("Which fold (0-based) is the validation set")
        self.folds_spin.valueChanged.connect(lambda n: self.fold_spin.setMaximum(n - 1))
        fold_page = QWidget()
        fold_row = QHBoxLayout(fold_page)
        fold_row.setContentsMargins(0, 0, 0, 0)
        fold_row.addWidget(self.folds_spin)
        fold_row.addWidget(self.fold_spin)
        self.split_stack = QStackedWidget()
        self.split_stack.addWidget(self.val_spin)
        self.split_stack.addWidget(fold_page)
        form.addRow("Validation", self._row(self.split_combo, self.split_stack))
        self.recipe_label = QLabel("")
        self.recipe_label.setWordWrap(True)
        self.recipe_label.setStyleSheet("color: gray;")
        form.addRow("", self.recipe_label)
        reset = QPushButton("Reset to the paper's recipe")
        reset.clicked.connect(self._network_changed)
        form.addRow("", reset)
        column.addWidget(box)

        # -- output, device, starting point
        box = QGroupBox("Output and device")
        form = self._form(box)
        self.out_edit = QLineEdit()
        self.out_edit.setToolTip("Checkpoints (last.pt, best.pt) and logs are written here")
        out_browse = _small_button("...", "Choose the output folder")
        out_browse.clicked.connect(lambda: self._browse_dir(self.out_edit))
        new_out = _small_button("New", "A fresh output folder for a new run (runs never share a folder)")
        new_out.clicked.connect(self.new_out_dir)
        form.addRow("Output", self._row(self.out_edit, out_browse, new_out))

        self.device_combo = QComboBox()
        for label, value in device_choices():
            self.device_combo.addItem(label, value)
        self.device_combo.setToolTip("CUDA GPUs found on this machine, or the CPU")
        form.addRow("Device", self.device_combo)

        self.resume_edit = QLineEdit()
        self.resume_edit.setPlaceholderText("optional: last.pt of an earlier run")
        self.resume_edit.setToolTip("Continue an earlier run from this checkpoint (its epochs, optimiser and schedule)")
        resume_browse = _small_button("...", "Choose a checkpoint to resume from")
        resume_browse.clicked.connect(self._browse_checkpoint)
        form.addRow("Resume", self._row(self.resume_edit, resume_browse))

        self.finetune_check = QCheckBox("Fine-tune from the shipped weights")
        form.addRow("", self.finetune_check)
        self.small_check = QCheckBox("Small network (shipped variant's size)")
        self.small_check.setToolTip("Use the network's shipped constructor arguments: much faster on a CPU")
        form.addRow("", self.small_check)
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("e.g. --max-steps-per-epoch 50")
        self.extra_edit.setToolTip("Advanced: more `python -m training train` flags, written as on a command line, e.g.\n"
                                   "--network-kwargs '{\"base\": 8}' --max-steps-per-epoch 50 --threads 2 --no-amp")
        form.addRow("Extra args", self.extra_edit)
        column.addWidget(box)
        column.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setFrameShape(QScrollArea.NoFrame)
        scroll.setWidget(page)
        self.setup_page = page
        return scroll

    @staticmethod
    def _form(box: QGroupBox) -> QFormLayout:
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        form.setContentsMargins(6, 6, 6, 6)
        return form

    @staticmethod
    def _row(*widgets) -> QWidget:
        holder = QWidget()
        row = QHBoxLayout(holder)
        row.setContentsMargins(0, 0, 0, 0)
        for i, w in enumerate(widgets):
            row.addWidget(w, 1 if i == 0 else 0)
        return holder

    def _build_progress_tab(self) -> QWidget:
        self.plot = TrainingPlot(self)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(3000)
        self.log_view.setPlaceholderText("Training output appears here.")
        self.log_view.setMinimumHeight(80)
        splitter = QSplitter(Qt.Vertical)
        splitter.addWidget(self.plot)
        splitter.addWidget(self.log_view)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        return splitter

    def _build_run_controls(self, layout: QVBoxLayout):
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("Start a new training run with these settings")
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; last.pt is written so the run can be resumed")
        self.stop_button.clicked.connect(self.stop)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the run in the output folder from its last.pt")
        self.resume_button.clicked.connect(self.resume)
        row = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button):
            row.addWidget(b)
        layout.addLayout(row)

        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status_label)

    # --------------------------------------------------------------- helpers
    def _network_changed(self, *_):
        spec = get_network(self.network_combo.currentData())
        recipe = spec.recipe
        self.epochs_spin.setValue(int(recipe.epochs))
        self.batch_spin.setValue(int(recipe.batch_size))
        self.lr_spin.setValue(float(recipe.lr))
        self.size_edit.setText(" ".join(str(int(s)) for s in recipe.input_size))
        augment = ", ".join(recipe.augmentation) or "none"
        self.recipe_label.setText(f"{spec.dims}D; {recipe.optimizer}, {recipe.schedule} schedule, weight decay "
                                  f"{recipe.weight_decay:g}; augmentation: {augment}")
        self.recipe_label.setToolTip(spec.paper)
        from .. import weights_catalog

        shipped = weights_catalog.shipped_entry(spec.name) is not None
        self.finetune_check.setEnabled(shipped)
        if not shipped:
            self.finetune_check.setChecked(False)
        self.finetune_check.setToolTip("Start from the weights shipped with the plugin" if shipped
                                       else f"No shipped weights for {spec.name}")
        if not self.out_edit.text() or self.out_edit.text() == self._auto_out_dir:
            self._auto_out_dir = default_out_dir(spec.name)
            self.out_edit.setText(self._auto_out_dir)

    def new_out_dir(self):
        self._auto_out_dir = default_out_dir(self.network_combo.currentData())
        self.out_edit.setText(self._auto_out_dir)

    def _data_source_changed(self, phantom: bool):
        for w in (self.data_edit, self.data_browse, self.check_button):
            w.setEnabled(not phantom)
        self._show_check("Synthetic chest CTs with lung and infection masks." if phantom else "")

    def _show_check(self, text: str):
        """The data-check line, hidden while empty so the form has no gap."""
        self.check_label.setText(text)
        self.check_label.setVisible(bool(text))

    def _split_changed(self, *_):
        self.split_stack.setCurrentIndex(self.split_combo.currentIndex())

    def _browse_dir(self, edit: QLineEdit):
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or str(Path.home()))
        if path:
            edit.setText(path)

    def _browse_checkpoint(self):
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint to resume", str(Path.home()), "Checkpoints (*.pt)")
        if path:
            self.resume_edit.setText(path)

    def set_network(self, name: str) -> None:
        index = self.network_combo.findData(name)
        if index < 0:
            raise InputError(f"unknown network {name!r}")
        self.network_combo.setCurrentIndex(index)

    def set_device(self, value: str) -> None:
        """Choose a device; one not in the list (e.g. ``cuda`` without a GPU) is added so the run says why it fails."""
        index = self.device_combo.findData(value)
        if index < 0:
            self.device_combo.addItem(value, value)
            index = self.device_combo.count() - 1
        self.device_combo.setCurrentIndex(index)

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.NotRunning

    def _update_buttons(self, *_):
        running = self.is_running()
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.setup_page.setEnabled(not running)  # the running process keeps the settings it started with
        out = self.out_edit.text().strip()
        self.resume_button.setEnabled(not running and bool(out) and (Path(out) / "last.pt").is_file())

    def request(self) -> TrainingRequest:
        """The form as a :class:`TrainingRequest` (raises ``InputError`` on bad values)."""
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
            extra_args=parse_extra_args(self.extra_edit.text()),
        )

    # ------------------------------------------------------------ check data
    def check_data(self):
        folder = self.data_edit.text().strip()
        if not folder:
            self._show_check("Choose a data folder first.")
            return
        if self.check_process is not None and self.check_process.state() != QProcess.NotRunning:
            return
        self._show_check("Checking...")
        self.check_button.setEnabled(False)
        proc = QProcess(self)
        proc.setProcessEnvironment(self._environment())
        proc.setProcessChannelMode(QProcess.SeparateChannels)
        proc.finished.connect(lambda code, _status: self._check_finished(proc, code))
        proc.errorOccurred.connect(lambda err: err == QProcess.FailedToStart and self._check_finished(proc, -1))
        self.check_process = proc
        proc.start(sys.executable, ["-m", "training", "check-data", folder])

    def _check_finished(self, proc: QProcess, code: int):
        self.check_button.setEnabled(not self.phantom_check.isChecked())
        out = bytes(proc.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(proc.readAllStandardError()).decode("utf-8", "replace").strip()
        if code != 0:
            reason = err.splitlines()[-1] if err else f"the check stopped with exit code {code}"
            self._show_check("Problem: " + re.sub(r"^error:\s*", "", reason))
            return
        try:
            report = json.loads(out)
        except ValueError:
            self._show_check(out.strip()[:500])
            return
        self._show_check(summarise_data_report(report))

    # ------------------------------------------------------------ run control
    def _environment(self) -> QProcessEnvironment:
        env = QProcessEnvironment()
        for key, value in child_environment().items():
            env.insert(key, value)
        return env

    def _fail_before_start(self, message: str):
        notify_error(message)
        self.status_label.setText(message)

    def start(self, request: Optional[TrainingRequest] = None):
        """Launch ``python -m training train`` for ``request`` (default: the form)."""
        if self.is_running():
            return
        try:
            request = request or self.request()
            request.validate()
            out = Path(request.out_dir)
            if request.resume is None and (out / "last.pt").exists():
                raise InputError(f"{out} already holds a training run (last.pt). Press Resume to continue it, "
                                 "or New (next to Output) for a new run in a fresh folder.")
            out.mkdir(parents=True, exist_ok=True)
        except CovidsegError as exc:
            self._fail_before_start(str(exc))
            return
        except OSError as exc:
            self._fail_before_start(f"Cannot create the output folder {request.out_dir}: {exc.strerror or exc}.")
            return
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
        self.total_epochs = int(request.epochs or 0)
        self.progress.setRange(0, max(1, self.total_epochs))
        epochs = self._epoch_records()
        self.progress.setValue(int(epochs[-1].get("epoch", 0)) if epochs else 0)
        self.plot.set_records(epochs)
        cmd = request.command()
        self.log_view.appendPlainText("$ " + " ".join(shlex.quote(c) for c in cmd))

        proc = QProcess(self)
        proc.setProcessEnvironment(self._environment())
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
        if not self.is_running():
            return
        self._stop_requested = True
        self.status_label.setText("Stopping: finishing the current step and writing a checkpoint ...")
        self.process.terminate()  # SIGTERM: the trainer checkpoints and exits
        QTimer.singleShot(GRACE_MS, self._kill_if_still_running)

    def _kill_if_still_running(self):
        if self.is_running() and self._stop_requested:
            self.log_view.appendPlainText("[napari-covidseg] the trainer did not stop in time; killing it")
            self.process.kill()

    def resume(self):
        """Continue the run in the output folder from its ``last.pt`` (same settings as it started with)."""
        if self.is_running():
            return
        out = self.out_edit.text().strip()
        same_run = self.last_request is not None and Path(self.last_request.out_dir) == Path(out)
        try:
            request = self.last_request if same_run else self.request()
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
            self.log_view.appendPlainText(text.rstrip("\n"))
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
        if not new:
            return
        for rec in new:
            if rec.get("event") in ("start", "epoch") and rec.get("epochs"):
                self.total_epochs = int(rec["epochs"])
                self.progress.setRange(0, max(1, self.total_epochs))
            if rec.get("event") == "epoch":
                self.progress.setValue(int(rec.get("epoch", 0)))
            elif rec.get("event") == "start" and not self._stop_requested:
                done = int(rec.get("resumed_from_epoch") or 0)
                self.status_label.setText(f"Running on {rec.get('device', '?')}: epoch {done + 1}/{self.total_epochs} ...")
        epochs = self._epoch_records()
        if any(r.get("event") == "epoch" for r in new):
            self.plot.set_records(epochs)
            session_epochs = [r for r in self._session_records() if r.get("event") == "epoch"]
            last = epochs[-1]
            eta = format_duration(eta_seconds(session_epochs or epochs, self.total_epochs))
            dice = last.get("val_dice_mean")
            dice_txt = f", val Dice {dice:.3f}" if isinstance(dice, (int, float)) else ""
            self.progress.setFormat(f"epoch %v / %m   ETA {eta}")
            if not self._stop_requested:
                self.status_label.setText(
                    f"Epoch {last.get('epoch')}/{self.total_epochs} done{dice_txt} on {last.get('device', '?')}; ETA {eta}")

    def _process_error(self, error):
        if error == QProcess.FailedToStart:
            message = f"The training process could not be started ({sys.executable}); is the Python environment complete?"
            self.status_label.setText(message)
            notify_error(message)
            self.poll_timer.stop()
            self._update_buttons()

    def _finished(self, exit_code: int, _exit_status=None):
        self._read_output()
        self.poll_metrics()
        self.poll_timer.stop()
        self.progress.setFormat("epoch %v / %m")
        request = self.last_request
        ends = [r for r in self._session_records() if r.get("event") == "end"]
        end = ends[-1] if ends else None
        status = (end or {}).get("status")
        if end is None and self._stop_requested:  # stopped before the trainer was up: nothing to keep
            status = "stopped"
        if status in ("finished", "stopped"):
            best = (end or {}).get("best_checkpoint")
            if not best and request is not None and (Path(request.out_dir) / "best.pt").is_file():
                best = str(Path(request.out_dir) / "best.pt")
            if best and Path(best).is_file():
                self.finished_checkpoint = best
                self._offer_checkpoint(best)
            self.last_status = status
            last = (end or {}).get("last_checkpoint")
            done = self._epoch_records()
            epoch_txt = f" after epoch {done[-1].get('epoch')}/{self.total_epochs}" if done else " before the first epoch ended"
            text = f"Training {status}{epoch_txt}."
            if status == "stopped" and last:
                text += f" Checkpoint written: {last}; press Resume to continue."
            if self.finished_checkpoint:
                text += f" Best checkpoint {Path(self.finished_checkpoint).name} is listed in the Segment widget."
            self.status_label.setText(text)
        else:
            self.last_status = "failed"
            message = plain_failure_message(end, exit_code, self._session_output[-FAILURE_LINES:])
            tail_lines = [_LOG_STAMP.sub("", ln) for ln in self._session_output if ln.strip()][-FAILURE_LINES:]
            self.status_label.setText("Training failed: " + message
                                      + ("\nLast log lines:\n" + "\n".join(ln[:160] for ln in tail_lines) if tail_lines else ""))
            self.log_view.appendPlainText("---- training failed: " + message)
            notify_error("Training failed: " + message)
        self._update_buttons()

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
        if self.is_running():
            self._stop_requested = True
            self.process.terminate()
            if not self.process.waitForFinished(timeout_ms):
                self.process.kill()
                self.process.waitForFinished(5000)
        self.poll_timer.stop()


def summarise_data_report(report: dict) -> str:
    """A short text from ``python -m training check-data``'s JSON report (format of
    ``training.datasets.check_data``: ``layout``, ``n_cases``, ``n_groups``, ``cases`` with each
    case's ``labels`` and ``infection_voxels``, ``problems``)."""
    layout = report.get("layout", "?")
    cases = report.get("cases") if isinstance(report.get("cases"), list) else []
    n = report.get("n_cases", len(cases))
    text = f"{n} case{'s' if n != 1 else ''} found ({layout} layout"
    groups = report.get("n_groups")
    if isinstance(groups, int) and groups != n:
        text += f", {groups} patients"
    text += ")"
    if cases:
        counts = {name: sum(1 for c in cases if name in (c.get("labels") or [])) for name in ("lung", "infection")}
        text += f": lung masks {counts['lung']}/{len(cases)}, infection masks {counts['infection']}/{len(cases)}"
        empty = sum(1 for c in cases if "infection" in (c.get("labels") or []) and c.get("infection_voxels") == 0)
        if empty:
            text += f" ({empty} with no infection)"
        shapes = [c.get("shape") for c in cases if isinstance(c.get("shape"), list) and len(c.get("shape")) == 3]
        if shapes:
            slices = sum(int(s[0]) for s in shapes)
            text += f"; {slices} slices"
    text += "."
    problems = report.get("problems") or []
    if problems:
        text += f"\n{len(problems)} problem(s): " + "; ".join(map(str, problems[:3]))
        if len(problems) > 3:
            text += " ..."
    return text
