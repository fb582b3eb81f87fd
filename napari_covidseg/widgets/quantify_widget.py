"""Quantify dock widget: lung and infection volumes, involvement per lung, lesion count.

The numbers a radiologist reports for COVID-19 pneumonia: how much of each lung is affected
(left and right by the patient's side, not the screen's: the display column index grows toward
the patient's left, see :mod:`napari_covidseg.io.geometry`), total involvement, infection and
lung volumes in mL and the number of separate lesions.  The computation is
:func:`napari_covidseg.quantify.quantify`; this widget picks the layers, shows the result as a
table, exports it (CSV or JSON) and recomputes it after edits (debounced, in a worker thread, so
painting a correction stays fluid and the table follows the corrected mask).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import CancelledError, CovidsegError, InputError
from ..quantify import quantify
from ._review import EditWatcher, LayerCombo, ask_overwrite
from .common import TaskRunner, image_layers, labels_layers, layer_spacing_known, notify_error

EDIT_DEBOUNCE_MS = 400

# (key in quantify()'s result without its unit suffix, row label, unit) in table order; other
# scalar keys follow.  Volumes ("vol") are in mL, or in voxels where the spacing is a placeholder.
ROWS: Tuple[Tuple[str, str, str], ...] = (
    ("infection", "Infection volume", "vol"),
    ("lung", "Lung volume", "vol"),
    ("left_involvement_pct", "Left lung involved", "%"),
    ("right_involvement_pct", "Right lung involved", "%"),
    ("total_involvement_pct", "Total involvement", "%"),
    ("n_lesions", "Lesions", ""),
    ("left_lung", "Left lung volume", "vol"),
    ("right_lung", "Right lung volume", "vol"),
    ("left_infection", "Left lung infection", "vol"),
    ("right_infection", "Right lung infection", "vol"),
    ("infection_outside_lung", "Infection outside lung", "vol"),
)
HIDDEN_KEYS = {"voxel_volume_ml", "lung_split_method", "spacing_known", "volume_unit"}  # in the exports, not in the table


def _plain(value):
    """JSON/CSV-friendly copy of a quantify() value (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in list(value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def table_rows(result: Dict) -> List[Tuple[str, str]]:
    """(label, text) rows for the table: the known keys first, then any other scalar key."""
    rows, shown = [], set()
    in_ml = result.get("volume_unit", "mL") == "mL"
    for base, label, unit in ROWS:
        key = base + ("_ml" if in_ml else "_voxels") if unit == "vol" else base
        if key not in result:
            continue
        shown.add(key)
        value = result[key]
        if key == "n_lesions" or (unit == "vol" and not in_ml):
            text = str(int(value)) + ("" if key == "n_lesions" else " voxels")
        elif value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "n/a"
        else:
            text = f"{float(value):.1f} {'mL' if unit == 'vol' else unit}".strip()
        rows.append((label, text))
    known = shown | HIDDEN_KEYS
    for key, value in result.items():
        if key in known:
            continue
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            rows.append((key.replace("_", " "), f"{float(value):.4g}"))
        elif isinstance(value, (list, tuple, np.ndarray)) and "lesion" in key and len(value):
            largest = sorted((float(v) for v in value), reverse=True)[:3]
            rows.append(("Largest lesions", ", ".join(f"{v:.1f}" if in_ml else f"{v:.0f}" for v in largest)
                         + (" mL" if in_ml else " voxels")))
    return rows


def write_quantify_csv(path, result: Dict, overwrite: bool = False) -> Path:
    """``quantity,value`` rows of every scalar in ``result`` (lists joined with ';')."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another file name (nothing was written).")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["quantity", "value"])
        for key, value in _plain(result).items():
            if isinstance(value, list):
                value = ";".join("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
            elif isinstance(value, float):
                value = f"{value:.6g}"
            writer.writerow([key, "" if value is None else value])
    return path


def write_quantify_json(path, result: Dict, layers: Dict[str, Optional[str]], overwrite: bool = False) -> Path:
    """The whole result (with the layer names it came from) as indented JSON."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another file name (nothing was written).")
    with open(path, "w") as fh:
        json.dump({"layers": layers, "result": _plain(result)}, fh, indent=2)
    return path


def run_quantify(lung, infection, spacing, spacing_known=True, progress=None, should_cancel=None):
    """quantify() for a :class:`TaskRunner`: it cannot stop half way, so Cancel drops the result."""
    result = quantify(lung, infection, spacing, spacing_known=spacing_known)
    if should_cancel is not None and should_cancel():
        raise CancelledError("Quantification cancelled.")
    return result


class QuantifyWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: Optional[Dict] = None

        self.lung_combo = LayerCombo(napari_viewer, labels_layers, prefer=lambda l: "lung" in l.name.lower())
        self.infection_combo = LayerCombo(
            napari_viewer, labels_layers, prefer=lambda l: "infection" in l.name.lower() or "lesion" in l.name.lower()
        )
        self.ct_combo = LayerCombo(napari_viewer, image_layers, allow_none=True, prefer=lambda l: True)
        form = QFormLayout()
        form.addRow("Lung mask", self.lung_combo)
        form.addRow("Infection mask", self.infection_combo)
        form.addRow("CT (spacing)", self.ct_combo)

        self.compute_button = QPushButton("Compute")
        self.compute_button.clicked.connect(self.compute)
        self.auto_check = QCheckBox("Update when the masks are edited")
        self.auto_check.setChecked(True)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Quantity", "Value"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.table.setMinimumHeight(120)
        self.csv_button = QPushButton("Export CSV...")
        self.csv_button.clicked.connect(lambda: self.export_dialog("csv"))
        self.json_button = QPushButton("Export JSON...")
        self.json_button.clicked.connect(lambda: self.export_dialog("json"))
        exports = QHBoxLayout()
        exports.addWidget(self.csv_button)
        exports.addWidget(self.json_button)
        self.runner = TaskRunner(self)
        self.runner.setVisible(False)  # shown only while quantify() runs
        self.runner.started.connect(lambda: self.runner.setVisible(True))
        self.runner.succeeded.connect(self._succeeded)
        self.runner.failed.connect(self._failed)
        self.runner.cancelled.connect(lambda: self.status.setText("Cancelled."))
        self.runner.finished.connect(self._finished)
        self.cancel_button = self.runner.cancel_button
        self._rerun = False
        self._pending = None
        self.status = QLabel("Pick the lung and infection masks, then press Compute.")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.compute_button)
        layout.addWidget(self.auto_check)
        layout.addWidget(self.table)
        layout.addLayout(exports)
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._set_export_enabled(False)

        self._edits = EditWatcher(self, self._auto_update, EDIT_DEBOUNCE_MS, enabled=self.auto_check.isChecked)

    def _set_export_enabled(self, enabled: bool):
        self.csv_button.setEnabled(enabled)
        self.json_button.setEnabled(enabled)

    # --- inputs ------------------------------------------------------------------------------
    def _inputs(self):
        lung, infection, ct = (c.current_layer() for c in (self.lung_combo, self.infection_combo, self.ct_combo))
        if lung is None or infection is None:
            raise InputError("Choose a lung mask and an infection mask (Labels layers).")
        if lung.data.shape != infection.data.shape:
            raise InputError(
                f"'{lung.name}' has shape {lung.data.shape} but '{infection.name}' has shape "
                f"{infection.data.shape}: pick masks of the same CT."
            )
        if ct is not None and tuple(ct.data.shape[-3:]) != tuple(lung.data.shape[-3:]):
            raise InputError(
                f"The CT '{ct.name}' has shape {tuple(ct.data.shape)} but the masks have shape "
                f"{lung.data.shape}: pick the CT the masks belong to (or none to use the masks' scale)."
            )
        spacing = tuple(float(s) for s in (ct if ct is not None else lung).scale[-3:])
        return lung, infection, ct, spacing

    # --- compute -----------------------------------------------------------------------------
    def compute(self):
        """Quantify the chosen masks in a worker thread (seconds on a full-size CT)."""
        try:
            lung, infection, ct, spacing = self._inputs()
        except CovidsegError as error:
            notify_error(error)
            self.status.setText(str(error))
            return None
        self._edits.watch([lung, infection])
        return self._launch(lung, infection, spacing, "Computing...")

    def _auto_update(self):
        """Recompute after an edit (debounced)."""
        try:
            lung, infection, ct, spacing = self._inputs()
        except CovidsegError as error:
            self.status.setText(str(error))
            return
        self._launch(lung, infection, spacing, "Updating after the edit...")

    def _launch(self, lung, infection, spacing, message: str):
        """Run quantify() on copies of the masks in the task runner (progress bar + Cancel).

        An edit that arrives while a run is going is remembered and run right after it, so the
        table always ends on the latest masks.
        """
        if self.runner.is_running():
            self._rerun = True
            return None
        self._rerun = False
        lung_data, infection_data = np.array(lung.data, copy=True), np.array(infection.data, copy=True)
        self._pending = ((lung.name, infection.name), spacing)
        self.status.setText(message)
        source = self.ct_combo.current_layer() or lung
        return self.runner.start(run_quantify, lung_data, infection_data, spacing, layer_spacing_known(source), status=message)

    def _succeeded(self, result):
        names, spacing = self._pending
        self._show(result, names[0], names[1], spacing)

    def _failed(self, error):
        self.status.setText(self.runner.status_label.text())

    def _finished(self):
        self.runner.setVisible(False)
        if self._rerun:
            self._rerun = False
            self._auto_update()

    def cancel(self):
        """Stop the running computation: its result is not shown."""
        self._edits.stop()
        self._rerun = False
        self.runner.cancel()

    def busy(self) -> bool:
        """True while an edit is waiting to be quantified or a computation is running."""
        return self._edits.pending() or self.runner.is_running() or self._rerun

    def _show(self, result, lung_name, infection_name, spacing):
        self.result = result
        self._layer_names = {"lung": lung_name, "infection": infection_name}
        rows = table_rows(result)
        self.table.setRowCount(len(rows))
        for r, (label, text) in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(label))
            value = QTableWidgetItem(text)
            value.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
            self.table.setItem(r, 1, value)
        # Show every row without a scroll bar: the table is short and read at a glance.
        height = self.table.horizontalHeader().height() + self.table.verticalHeader().length() + 4
        self.table.setMinimumHeight(height)
        self.table.setMaximumHeight(height)
        self._set_export_enabled(True)
        voxel = (f"voxel {spacing[0]:.2f} x {spacing[1]:.2f} x {spacing[2]:.2f} mm" if result.get("spacing_known", True)
                 else "voxel size unknown (a placeholder in the file), so volumes are voxel counts, not mL")
        self.status.setText(
            f"'{infection_name}' in '{lung_name}', {voxel}. "
            "Left and right are the patient's"
            + (f" (lungs split by {result['lung_split_method']})." if result.get("lung_split_method") else ".")
        )

    def value_text(self, label: str) -> Optional[str]:
        """The table text of the row called ``label`` (for tests and scripting)."""
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).text() == label:
                return self.table.item(r, 1).text()
        return None

    # --- export ------------------------------------------------------------------------------
    def export(self, path, kind: str, overwrite: bool = False) -> Path:
        if self.result is None:
            raise InputError("Press Compute first: there is nothing to export yet.")
        if kind == "csv":
            return write_quantify_csv(path, self.result, overwrite=overwrite)
        return write_quantify_json(path, self.result, self._layer_names, overwrite=overwrite)

    def export_dialog(self, kind: str):
        if self.result is None:
            return
        stem = f"{self._layer_names['infection']}_quantification".replace(" ", "_")
        path, _ = QFileDialog.getSaveFileName(
            self,
            f"Export quantification as {kind.upper()}",
            f"{stem}.{kind}",
            f"{kind.upper()} files (*.{kind})",
            options=QFileDialog.DontConfirmOverwrite,
        )
        if not path:
            return
        overwrite = False
        if Path(path).exists():
            if not ask_overwrite(self, path):
                return
            overwrite = True
        try:
            written = self.export(path, kind, overwrite=overwrite)
        except (CovidsegError, OSError) as error:
            notify_error(error)
            return
        self.status.setText(f"Quantification written to {written}")
