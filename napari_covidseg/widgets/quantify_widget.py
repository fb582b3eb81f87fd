"""Quantify dock widget: severity, involvement per lung, volumes, lesions, ground glass vs
consolidation.

The numbers a radiologist reports for COVID-19 pneumonia: the MosMedData severity grade (CT-0..4)
and a per-lung score, how much of each lung is affected (left and right by the patient's side,
not the screen's: the display column index grows toward the patient's left, see
:mod:`napari_covidseg.io.geometry`), over lung plus infection so a consolidation the lung mask
left out still counts, infection and lung volumes in mL, the lesions above a minimum size
(0.1 mL by default) and, for a CT in HU, ground glass vs consolidation.  The computation is
:func:`napari_covidseg.quantify.quantify`; this widget picks the layers (the corrected masks
first), shows the result, exports it (CSV or JSON) and recomputes it after edits (debounced, in a
worker thread, so painting a correction stays fluid and the table follows the corrected mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..errors import CancelledError, CovidsegError, InputError
from ..intensity import HU
from ..quantify import MIN_LESION_ML, quantify
from ._review import EditWatcher, LayerCombo, ask_overwrite
from .common import (
    TaskRunner,
    form_layout,
    image_layers,
    labels_layers,
    layer_domain,
    layer_spacing_known,
    notify_error,
    push_button,
    scrolling_rows,
)
from .quantify_table import ROWS, severity_text, table_rows, write_quantify_csv, write_quantify_json  # noqa: F401
from .save_defaults import class_mask_score

EDIT_DEBOUNCE_MS = 400


def run_quantify(lung, infection, spacing, spacing_known=True, min_lesion_ml=MIN_LESION_ML, ct_hu=None,
                 progress=None, should_cancel=None):
    """quantify() for a :class:`TaskRunner`: it cannot stop half way, so Cancel drops the result."""
    result = quantify(lung, infection, spacing, min_lesion_ml=min_lesion_ml, spacing_known=spacing_known, ct_hu=ct_hu)
    if should_cancel is not None and should_cancel():
        raise CancelledError("Quantification cancelled.")
    return result


class QuantifyWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: Optional[Dict] = None
        self._layer_names: Dict[str, str] = {}
        self.lung_combo = LayerCombo(napari_viewer, labels_layers, prefer=class_mask_score("lung"))
        self.infection_combo = LayerCombo(napari_viewer, labels_layers, prefer=class_mask_score("infection"))
        self.ct_combo = LayerCombo(napari_viewer, image_layers, allow_none=True, prefer=lambda l: True)
        self.min_lesion_spin = QDoubleSpinBox()
        self.min_lesion_spin.setToolTip("Infection components smaller than this are not counted as lesions (they "
                                        "still count in the volumes): in mL, or in voxels where the CT's voxel "
                                        "size is a placeholder")
        self._lesion_in_voxels = None
        self._set_lesion_unit(False, MIN_LESION_ML)
        self.min_lesion_spin.valueChanged.connect(lambda *_: self.result is not None and self._auto_update())
        for combo in (self.ct_combo, self.lung_combo):
            combo.currentIndexChanged.connect(self._follow_lesion_unit)
        self.compute_button = push_button("Compute", on_click=self.compute)
        self.auto_check = QCheckBox("Update when the masks are edited")
        self.auto_check.setChecked(True)
        self.severity_label = QLabel("")
        self.severity_label.setWordWrap(True)
        self.severity_label.setStyleSheet("font-weight: bold; font-size: 14px;")
        self.severity_label.setVisible(False)
        self.table = self._make_table()
        self.csv_button = push_button("Export CSV...", on_click=lambda: self.export_dialog("csv"))
        self.json_button = push_button("Export JSON...", on_click=lambda: self.export_dialog("json"))
        self.report_button = push_button("Case report (PNG + CSV)...",
                                         "Key slices with the masks, this table, and the network that made them "
                                         "with its model card: the picture to attach to a study",
                                         self.report_dialog)
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
        self._lay_out()
        self._set_export_enabled(False)
        self._edits = EditWatcher(self, self._auto_update, EDIT_DEBOUNCE_MS, enabled=self.auto_check.isChecked)
        self._follow_lesion_unit()

    # --- the smallest lesion: mL, or voxels where the voxel size is a placeholder ------------------
    def min_lesion_ml(self) -> float:
        """The smallest lesion as :func:`quantify` takes it (mL; 1000 voxels where the size is unknown)."""
        value = float(self.min_lesion_spin.value())
        return value / 1000.0 if self._lesion_in_voxels else value

    def _geometry_layer(self):
        """The layer whose voxel size the volumes use: the chosen CT, else the lung mask."""
        ct = self.ct_combo.current_layer()
        return ct if ct is not None else self.lung_combo.current_layer()

    def _follow_lesion_unit(self, *_):
        source = self._geometry_layer()
        in_voxels = source is not None and not layer_spacing_known(source)
        if in_voxels != self._lesion_in_voxels:
            self._set_lesion_unit(in_voxels, self.min_lesion_ml())

    def _set_lesion_unit(self, in_voxels: bool, min_lesion_ml: float) -> None:
        spin = self.min_lesion_spin
        spin.blockSignals(True)  # the same size in another unit: nothing to recompute
        self._lesion_in_voxels = in_voxels
        decimals, top, step, suffix, value = ((0, 1e5, 10.0, " voxels", round(min_lesion_ml * 1000.0)) if in_voxels
                                              else (2, 100.0, 0.05, " mL", min_lesion_ml))
        spin.setDecimals(decimals)
        spin.setRange(0.0, top)
        spin.setSingleStep(step)
        spin.setSuffix(suffix)
        spin.setValue(value)
        spin.blockSignals(False)

    def _make_table(self) -> QTableWidget:
        table = QTableWidget(0, 2)
        table.setHorizontalHeaderLabels(["Quantity", "Value"])
        table.verticalHeader().setVisible(False)
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        table.setMinimumHeight(120)
        return table

    def _lay_out(self):
        form = form_layout([("Lung mask", self.lung_combo), ("Infection mask", self.infection_combo),
                            ("CT", self.ct_combo), ("Smallest lesion", self.min_lesion_spin)])
        exports = QHBoxLayout()
        exports.addWidget(self.csv_button)
        exports.addWidget(self.json_button)
        layout = scrolling_rows(self)
        layout.addLayout(form)
        layout.addWidget(self.compute_button)
        layout.addWidget(self.auto_check)
        layout.addWidget(self.severity_label)
        layout.addWidget(self.table)
        layout.addLayout(exports)
        layout.addWidget(self.report_button)
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _set_export_enabled(self, enabled: bool):
        for button in (self.csv_button, self.json_button, self.report_button):
            button.setEnabled(enabled)

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
        spacing = tuple(float(s) for s in self._geometry_layer().scale[-3:])
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
        ct = self.ct_combo.current_layer()
        ct_hu = np.asarray(ct.data) if ct is not None and layer_domain(ct) == HU else None  # GGO vs consolidation
        spacing_known = layer_spacing_known(self._geometry_layer())
        return self.runner.start(run_quantify, lung_data, infection_data, spacing, spacing_known,
                                 self.min_lesion_ml(), ct_hu, status=message)

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
        self.severity_label.setText(severity_text(result))
        self.severity_label.setVisible(True)
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

    # --- case report -------------------------------------------------------------------------
    def report_dialog(self):
        if self.result is None:
            return
        from .case_report import default_report_name

        path, _ = QFileDialog.getSaveFileName(self, "Case report", default_report_name(self), "PNG image (*.png)")
        if not path:
            return
        try:
            png, csv_path = self.write_report(path)
        except (CovidsegError, OSError) as error:
            notify_error(error)
            return
        self.status.setText(f"Report written to {png} and {csv_path.name}")

    def write_report(self, png_path):
        """Write ``<name>.png`` and ``<name>.csv`` for the masks quantified last; returns both paths."""
        from .case_report import build_report
        from ..report import write_case_csv, write_case_report

        if self.result is None:
            raise InputError("Press Compute first: there is nothing to report yet.")
        report = build_report(self)
        png_path = Path(png_path).with_suffix(".png")
        return write_case_report(png_path, report), write_case_csv(png_path.with_suffix(".csv"), report)
