"""The Train widget's "Setup" page: network, data, recipe, output and device, as a
:class:`~napari_covidseg.training_run.TrainingRequest`.

The recipe is prefilled from the network's paper; "Quick CPU fine-tune" sets what a laptop can do
in minutes (the shipped small network, a few short epochs from the shipped weights).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import List

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ..errors import InputError
from ..models import get_network, network_names
from ..training_run import PHANTOM, TrainingRequest
from .common import DeviceCombo, compact_combo, path_field, push_button

#: "Quick CPU fine-tune": from the shipped weights, the small network, a few short epochs
QUICK_EPOCHS = 3
QUICK_STEPS_PER_EPOCH = 40


def default_out_dir(network: str) -> str:
    """A fresh folder per run, so a new run never overwrites an earlier run's checkpoints."""
    return str(Path.home() / "covidseg-runs" / f"{network}-{time.strftime('%Y%m%d-%H%M%S')}")


def parse_extra_args(text: str) -> List[str]:
    """Split the "Extra arguments" line like a shell would (quotes keep JSON in one piece)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InputError(f"Extra arguments {text!r} cannot be read ({exc}); check the quotes.") from None


def small_button(text: str, tip: str) -> QPushButton:
    button = push_button(text, tip)
    button.setMaximumWidth(button.fontMetrics().horizontalAdvance(text) + 24)
    return button


def _form(box: QGroupBox) -> QFormLayout:
    form = QFormLayout(box)
    form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    form.setContentsMargins(6, 6, 6, 6)
    return form


def _row(*widgets) -> QWidget:
    holder = QWidget()
    row = QHBoxLayout(holder)
    row.setContentsMargins(0, 0, 0, 0)
    for i, w in enumerate(widgets):
        row.addWidget(w, 1 if i == 0 else 0)
    return holder


class TrainingForm(QWidget):
    """The setup fields; ``request()`` reads them.  ``check_requested`` asks for a data check."""

    check_requested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._auto_out_dir = ""
        column = QVBoxLayout(self)
        column.setContentsMargins(2, 2, 2, 2)
        column.addWidget(self._network_and_data())
        column.addWidget(self._recipe())
        column.addWidget(self._output_and_device())
        column.addStretch(1)
        self.network_changed()
        self.data_source_changed(True)
        self.split_stack.setCurrentIndex(0)

    # --- building ------------------------------------------------------------------------------
    def _network_and_data(self) -> QGroupBox:
        box = QGroupBox("Network and data")
        form = _form(box)
        self.network_combo = compact_combo(QComboBox())
        for name in network_names():
            spec = get_network(name)
            self.network_combo.addItem(f"{spec.title}  [{name}]", name)
            self.network_combo.setItemData(self.network_combo.count() - 1, f"{spec.dims}D network\n{spec.paper}",
                                           Qt.ToolTipRole)
        self.network_combo.currentIndexChanged.connect(self.network_changed)
        form.addRow("Network", self.network_combo)
        self.phantom_check = QCheckBox("Built-in phantom")
        self.phantom_check.setChecked(True)
        self.phantom_check.setToolTip("Train on synthetic chest CTs with lung and infection masks (no data needed)")
        self.phantom_check.toggled.connect(self.data_source_changed)
        form.addRow("Data", self.phantom_check)
        self.data_browse, self.data_edit = path_field(
            "d", "folder with CT and masks", "COVID-19-CT-Seg (Zenodo 3757476), MedSeg, or images/ + lung/ + infection/")
        self.check_button = small_button("Check", "Count the cases and labels found in the folder before starting")
        self.check_button.clicked.connect(self.check_requested.emit)
        form.addRow("Folder", _row(self.data_browse, self.check_button))
        self.check_label = QLabel("")
        self.check_label.setWordWrap(True)
        self.check_label.setAlignment(Qt.AlignLeft | Qt.AlignTop)  # under its folder, not floating in its row
        self.check_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("", self.check_label)
        self.target_combo = QComboBox()
        self.target_combo.addItems(["both", "lung", "infection"])
        self.target_combo.setToolTip("Which masks the network learns (both: lung and infection outputs)")
        form.addRow("Target", self.target_combo)
        return box

    def _recipe(self) -> QGroupBox:
        box = QGroupBox("Recipe (prefilled from the paper)")
        form = _form(box)
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
        split_combo, split_stack = self._split_fields()
        form.addRow("Validation", split_combo)
        form.addRow("", split_stack)
        self.recipe_label = QLabel("")
        self.recipe_label.setWordWrap(True)
        self.recipe_label.setStyleSheet("color: gray;")
        form.addRow("", self.recipe_label)
        reset = push_button("Paper's recipe", "Reset epochs, batch, learning rate and input size to the network's paper",
                            self.network_changed)
        self.quick_button = push_button("Quick CPU fine-tune",
                                        f"From the shipped weights, the small network, {QUICK_EPOCHS} epochs of "
                                        f"{QUICK_STEPS_PER_EPOCH} steps on the CPU: minutes, not hours",
                                        self.quick_cpu_finetune)
        form.addRow("", reset)
        form.addRow("", self.quick_button)
        return box

    def _split_fields(self):
        self.split_combo = QComboBox()
        self.split_combo.addItems(["hold-out", "k-fold"])
        self.split_combo.setToolTip("Hold out a fraction of the cases for validation, or cross-validate by folds")
        self.split_combo.currentIndexChanged.connect(lambda index: self.split_stack.setCurrentIndex(index))
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
        self.split_stack = QStackedWidget()
        self.split_stack.addWidget(self.val_spin)
        self.split_stack.addWidget(_row(self.folds_spin, self.fold_spin))
        return self.split_combo, self.split_stack

    def _output_and_device(self) -> QGroupBox:
        box = QGroupBox("Output and device")
        form = _form(box)
        out_field, self.out_edit = path_field("d", "", "Checkpoints (last.pt, best.pt) and logs are written here")
        new_out = small_button("New", "A fresh output folder for a new run (runs never share a folder)")
        new_out.clicked.connect(self.new_out_dir)
        form.addRow("Output", _row(out_field, new_out))
        self.device_combo = DeviceCombo("CUDA GPUs found on this machine, or the CPU")
        form.addRow("Device", self.device_combo)
        resume_field, self.resume_edit = path_field(
            "r", "optional: last.pt of an earlier run",
            "Continue an earlier run from this checkpoint (its epochs, optimiser and schedule)", filter="*.pt")
        form.addRow("Resume", resume_field)
        self.finetune_check = QCheckBox("Fine-tune shipped weights")
        form.addRow("", self.finetune_check)
        self.small_check = QCheckBox("Small network (shipped size)")
        self.small_check.setToolTip("Use the network's shipped constructor arguments: much faster on a CPU")
        form.addRow("", self.small_check)
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("e.g. --max-steps-per-epoch 50")
        self.extra_edit.setToolTip("Advanced: more `python -m training train` flags, written as on a command line, e.g.\n"
                                   "--network-kwargs '{\"base\": 8}' --max-steps-per-epoch 50 --threads 2 --no-amp")
        form.addRow("Extra args", self.extra_edit)
        return box

    # --- reacting ------------------------------------------------------------------------------
    def network_changed(self, *_):
        from .. import weights_catalog

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
        shipped = weights_catalog.shipped_entry(spec.name) is not None
        self.finetune_check.setEnabled(shipped)
        if not shipped:
            self.finetune_check.setChecked(False)
        self.finetune_check.setToolTip("Start from the weights shipped with the plugin" if shipped
                                       else f"No shipped weights for {spec.name}")
        if not self.out_edit.text() or self.out_edit.text() == self._auto_out_dir:
            self.new_out_dir()

    def quick_cpu_finetune(self) -> None:
        """What a CPU can train in minutes: shipped weights, small network, a few short epochs."""
        self.finetune_check.setChecked(self.finetune_check.isEnabled())
        self.small_check.setChecked(True)
        self.epochs_spin.setValue(QUICK_EPOCHS)
        self.set_device("cpu")
        extra = [a for a in parse_extra_args(self.extra_edit.text()) if a]
        if "--max-steps-per-epoch" not in extra:
            extra += ["--max-steps-per-epoch", str(QUICK_STEPS_PER_EPOCH)]
        self.extra_edit.setText(" ".join(shlex.quote(a) for a in extra))

    def new_out_dir(self):
        self._auto_out_dir = default_out_dir(self.network_combo.currentData())
        self.out_edit.setText(self._auto_out_dir)

    def data_source_changed(self, phantom: bool):
        for w in (self.data_edit, self.data_browse, self.check_button):
            w.setEnabled(not phantom)
        self.show_check("Synthetic chest CTs with lung and infection masks." if phantom else "")

    def show_check(self, text: str):
        """The data-check line, hidden while empty so the form has no gap."""
        self.check_label.setText(text)
        self.check_label.setVisible(bool(text))

    def set_network(self, name: str) -> None:
        index = self.network_combo.findData(name)
        if index < 0:
            raise InputError(f"unknown network {name!r}")
        self.network_combo.setCurrentIndex(index)

    def set_device(self, value: str) -> None:
        self.device_combo.set_device(value)

    def data_folder(self) -> str:
        return PHANTOM if self.phantom_check.isChecked() else self.data_edit.text().strip()

    # --- reading -------------------------------------------------------------------------------
    def request(self) -> TrainingRequest:
        """The form as a :class:`TrainingRequest` (raises ``InputError`` on bad values)."""
        try:
            size = [int(s) for s in self.size_edit.text().replace(",", " ").replace("x", " ").split()]
        except ValueError:
            raise InputError(f"Input size {self.size_edit.text()!r} is not a list of integers, e.g. '256 256'.") from None
        spec = get_network(self.network_combo.currentData())
        if len(size) != spec.dims:
            raise InputError(f"{spec.name} is a {spec.dims}D network: give {spec.dims} numbers as input size.")
        if not self.data_folder():
            raise InputError("Choose a data folder (the ... button), or tick the built-in phantom.")
        kfold = self.split_combo.currentIndex() == 1
        return TrainingRequest(
            network=spec.name, data=self.data_folder(), out_dir=self.out_edit.text().strip(),
            target=self.target_combo.currentText(), epochs=self.epochs_spin.value(), batch_size=self.batch_spin.value(),
            lr=self.lr_spin.value(), input_size=size, val_fraction=None if kfold else self.val_spin.value(),
            folds=self.folds_spin.value() if kfold else None, fold=self.fold_spin.value() if kfold else None,
            device=self.device_combo.currentData(), resume=self.resume_edit.text().strip() or None,
            init_from="shipped" if self.finetune_check.isChecked() else None, small_network=self.small_check.isChecked(),
            extra_args=parse_extra_args(self.extra_edit.text()),
        )
