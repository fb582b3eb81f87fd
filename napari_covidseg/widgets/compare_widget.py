"""Compare-to-ground-truth dock widget: where and how much a prediction disagrees with the truth.

The user picks a prediction and a ground-truth Labels layer.  The widget adds an overlay layer
"<pred> vs <gt>" (green = true positive, red = missed, yellow = extra), a table of Dice, IoU,
sensitivity, specificity, precision and HD95 for the slice on screen and for the whole volume,
and a per-slice Dice plot with the current slice marked (click it to jump there).  "Worst slice"
and "Next" / "Previous" walk the slices from the lowest Dice up, which is where a reviewer should
look first.  Outlines, hiding the compared masks and the overlay switch keep the CT's texture
readable (:mod:`compare_display`); keys on the canvas: N / Shift-N next / previous worst slice,
Shift-O overlay on/off, Shift-C outlines on/off.  Everything follows the data: changing the slice updates the slice column, painting into
either layer updates everything after a short pause (debounced so the brush stays fluid).

The GUI thread only ever works on one slice: Compare and every edit start one worker that counts
the whole volume once (overlay, per-slice and volume counts, :func:`..overlay.compare_masks`) and
then computes the volume HD95; the GUI thread redoes the edited slice at once and shows the
worker's results as they arrive (a result made stale by a newer edit is dropped).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QGridLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..errors import CovidsegError
from ..overlay import (
    METRIC_COLUMNS,
    OVERLAY_NAMES,
    OVERLAY_RGB,
    check_same_shape,
    compare_masks,
    overlay_color_dict,
    rank_worst_slices,
    region_metrics,
    write_comparison_csv,
)
from .common import (
    TaskRunner,
    add_labels_like,
    form_layout,
    labels_layers,
    layer_spacing_known,
    notify_error,
    push_button,
    scrolling_rows,
)
from ._review import EditWatcher, LayerCombo, ask_overwrite, current_slice, go_to_slice
from .compare_compute import (  # noqa: F401 (part of this module's API)
    comparison_report,
    format_metric,
    run_comparison_report,
    volume_comparison,
    volume_comparison_fast,
)
from .compare_display import ReviewDisplay, colour_as_reference
from .slice_dice_plot import SliceDicePlot
from .save_defaults import looks_like_ground_truth, mask_class, mask_score, reference_score  # noqa: F401 (API)

#: legend words short enough for a narrow dock (the tooltips hold OVERLAY_NAMES)
OVERLAY_SHORT_NAMES = {1: "agree (TP)", 2: "missed (FN)", 3: "extra (FP)"}
#: review keys on the canvas -> CompareWidget method (none of them is a napari image/labels key)
REVIEW_KEYS = {"N": "go_to_next_worst", "Shift-N": "go_to_previous_worst", "Shift-O": "toggle_overlay",
               "Shift-C": "toggle_outlines"}
EDIT_DEBOUNCE_MS = 250  # recompute this long after the last brush dab
OVERLAY_OPACITY = 0.6


def overlay_name(pred_name: str, gt_name: str) -> str:
    return f"{pred_name} vs {gt_name}"


class CompareWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.pred_layer = None
        self.gt_layer = None
        self.overlay_layer = None
        self.slice_dice = np.array([])
        self.volume_metrics: Dict[str, Optional[float]] = {}
        self.slice_values: Dict[str, float] = {}
        self.ranking = np.array([], dtype=int)
        self.rank_position = -1
        self._generation = 0  # bumps on every recompute; stale HD95 results are dropped
        self._hd95_worker = None
        self._volume_running = False  # a whole-volume worker (after an edit) is running
        self._volume_dirty = False  # an edit arrived while it ran: run it again when it ends

        self.gt_combo = LayerCombo(napari_viewer, labels_layers, prefer=reference_score())
        self.pred_combo = LayerCombo(napari_viewer, labels_layers, prefer=self._prediction_score)
        self.gt_combo.currentIndexChanged.connect(lambda *_: self.pred_combo.repick())
        self.compare_button = push_button("Compare", "Add the overlay layer and compute the metrics", self.compare)

        # one wrapping line of coloured squares and words, so the legend never widens the dock
        self.legend = QLabel("&nbsp;&nbsp; ".join(
            f"<span style='color: rgb{rgb}; font-size: large;'>&#9632;</span>&nbsp;{OVERLAY_SHORT_NAMES[value]}"
            for value, rgb in OVERLAY_RGB.items()))
        self.legend.setWordWrap(True)
        self.legend.setToolTip("\n".join(f"{OVERLAY_SHORT_NAMES[v]}: {OVERLAY_NAMES[v]}" for v in OVERLAY_RGB))

        self.table = self._make_table()
        self.plot = SliceDicePlot(on_click=self.go_to_slice)

        self.worst_button = push_button("Worst slice", "Go to the slice with the lowest Dice", self.go_to_worst)
        self.next_worst_button = push_button("Next \u25b6", "Go to the slice with the next lowest Dice (cycles; key N)",
                                             self.go_to_next_worst)
        self.previous_worst_button = push_button("\u25c0 Previous",
                                                 "Back to the slice with the next higher Dice in the worst-first order "
                                                 "(key Shift-N)",
                                                 self.go_to_previous_worst)
        self.export_button = push_button("Export CSV...", "Per-slice metrics and the volume summary as a CSV file",
                                         self.export_csv_dialog)

        self.runner = TaskRunner(self, unit="slices")
        self.runner.setVisible(False)  # shown only while an export runs
        self.runner.started.connect(lambda: self.runner.setVisible(True))
        self.runner.succeeded.connect(self._export_done)
        self.runner.cancelled.connect(lambda: self.status.setText("Export cancelled; nothing was written."))
        self.runner.finished.connect(self._export_finished)
        self._export_target = None

        self.status = QLabel("Pick a prediction and its ground truth, then press Compare.")
        self.status.setWordWrap(True)

        self._lay_out()
        self._set_result_buttons(False)

        self._edits = EditWatcher(self, self._after_edit, EDIT_DEBOUNCE_MS)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._bind_review_keys()

    def _prediction_score(self, layer) -> int:
        """The prediction to pick: a mask a network (or an edit) made, of the ground truth's class
        first (an infection reference is compared with an infection mask, not the lung's)."""
        reference = self.gt_combo.current_layer()
        score = mask_score(layer)
        if layer is reference or score == 0:
            return 0
        cls = mask_class(layer)
        same_class = reference is not None and cls is not None and cls == mask_class(reference)
        return score + (10 if same_class else 0)

    def _make_table(self) -> QTableWidget:
        table = QTableWidget(len(METRIC_COLUMNS), 2)
        table.setHorizontalHeaderLabels(["This slice", "Volume"])
        table.setVerticalHeaderLabels([label for _, label in METRIC_COLUMNS])
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        row_height = self.fontMetrics().height() + 10
        table.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        table.verticalHeader().setDefaultSectionSize(row_height)
        table.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        # Every row visible, no scroll bar (the header is about one row high; margin for the frame).
        table.setFixedHeight((len(METRIC_COLUMNS) + 1) * row_height + 2 * table.frameWidth() + 6)
        for row in range(len(METRIC_COLUMNS)):
            for col in range(2):
                item = QTableWidgetItem("")
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                table.setItem(row, col, item)
        return table

    def _lay_out(self):
        layout = scrolling_rows(self)
        layout.addLayout(form_layout([("Prediction", self.pred_combo), ("Ground truth", self.gt_combo)]))
        layout.addWidget(self.compare_button)
        layout.addLayout(self._display_switches())
        layout.addWidget(self.legend)
        layout.addWidget(self.table)
        plot_title = QLabel("Dice per slice (click to go to a slice)")
        plot_title.setWordWrap(True)
        layout.addWidget(plot_title)
        layout.addWidget(self.plot)
        nav = QGridLayout()
        nav.addWidget(self.previous_worst_button, 0, 0)
        nav.addWidget(self.worst_button, 0, 1)
        nav.addWidget(self.next_worst_button, 0, 2)
        nav.addWidget(self.export_button, 1, 0, 1, 3)
        layout.addLayout(nav)
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _display_switches(self) -> QGridLayout:
        self.display = ReviewDisplay()
        self.outline_check = QCheckBox("Outlines")
        self.outline_check.setToolTip("Draw the overlay and the masks as outlines, so the CT texture under a "
                                      "lesion stays visible (key Shift-C)")
        self.outline_check.toggled.connect(self.display.set_outlines)
        self.hide_check = QCheckBox("Hide the compared masks")
        self.hide_check.setChecked(True)
        self.hide_check.setToolTip("While comparing, show only the overlay: the ground truth is hidden and the "
                                   "prediction transparent (the brush still paints it)")
        self.hide_check.toggled.connect(self.display.set_sources_hidden)
        self.display.sources_hidden = True
        self.overlay_check = QCheckBox("Overlay")
        self.overlay_check.setChecked(True)
        self.overlay_check.setToolTip("Show the agree / missed / extra overlay (key Shift-O)")
        self.overlay_check.toggled.connect(self.display.set_overlay_shown)
        switches = QGridLayout()
        switches.addWidget(self.overlay_check, 0, 0)
        switches.addWidget(self.outline_check, 0, 1)
        switches.addWidget(self.hide_check, 1, 0, 1, 2)
        return switches

    def _bind_review_keys(self) -> None:
        """N / Shift-N / Shift-O / Shift-C on the canvas act on this widget while it lives."""
        import weakref

        widget = weakref.ref(self)

        def handler(method):
            def on_key(viewer):
                target = widget()
                try:
                    if target is not None:
                        getattr(target, method)()
                except RuntimeError:  # the widget was closed: its Qt half is gone
                    pass
            return on_key

        for key, method in REVIEW_KEYS.items():
            self.viewer.bind_key(key, handler(method), overwrite=True)

    def toggle_overlay(self) -> None:
        self.overlay_check.setChecked(not self.overlay_check.isChecked())

    def toggle_outlines(self) -> None:
        self.outline_check.setChecked(not self.outline_check.isChecked())

    # --- setup -------------------------------------------------------------------------------
    def _set_result_buttons(self, enabled: bool):
        for button in (self.worst_button, self.next_worst_button, self.previous_worst_button, self.export_button):
            button.setEnabled(enabled)

    def compare(self):
        """Compare the chosen layers: add/update the overlay layer and all the numbers."""
        pred, gt = self.pred_combo.current_layer(), self.gt_combo.current_layer()
        try:
            if pred is None or gt is None:
                raise CovidsegError("Choose a prediction and a ground-truth Labels layer to compare.")
            if pred is gt:
                raise CovidsegError("The prediction and the ground truth are the same layer: pick two different layers.")
            check_same_shape(pred.data, gt.data, pred.name, gt.name)
        except CovidsegError as error:
            notify_error(error)
            self.status.setText(str(error))
            return
        self.pred_layer, self.gt_layer = pred, gt
        self.rank_position = -1
        self.overlay_layer = None
        colour_as_reference(gt)
        self.display.set_layers(pred, gt)
        self._show_hd95_unit(layer_spacing_known(pred) and layer_spacing_known(gt))
        self._edits.watch([pred, gt])
        self.recompute()
        # Keep the prediction active so the brush paints the prediction, not the new overlay.
        self.viewer.layers.selection.active = pred

    def _show_hd95_unit(self, spacing_known: bool) -> None:
        """HD95 in mm where the spacing is real, in voxels (px) where it is a placeholder."""
        row = [key for key, _ in METRIC_COLUMNS].index("hd95_mm")
        self.table.verticalHeaderItem(row).setText("HD95 (mm)" if spacing_known else "HD95 (px)")
        self.table.verticalHeaderItem(row).setToolTip(
            "" if spacing_known else "The voxel size of this CT is a placeholder, so HD95 is in voxels, not mm")

    def _spacing(self):
        return tuple(float(s) for s in self.pred_layer.scale[-3:])

    def _ensure_overlay(self, overlay: np.ndarray):
        name = overlay_name(self.pred_layer.name, self.gt_layer.name)
        layer = self.overlay_layer
        if layer is None or layer not in self.viewer.layers:
            layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is not None and layer.data.shape == overlay.shape:
            layer.data = overlay  # keeps the user's opacity, blending and visibility
        else:
            if layer is not None:
                self.viewer.layers.remove(layer)
            active = self.viewer.layers.selection.active
            layer = add_labels_like(self.viewer, overlay, name, self.pred_layer, opacity=OVERLAY_OPACITY)
            if active is not None and active in self.viewer.layers:  # adding selects it: the brush stays where it was
                self.viewer.layers.selection.active = active
        self._apply_overlay_colours(layer)
        layer.editable = False  # an overlay edited by hand would no longer mean anything
        if layer is not self.overlay_layer:
            self.display.set_overlay(layer)
        self.overlay_layer = layer

    @staticmethod
    def _apply_overlay_colours(layer):
        from napari.utils.colormaps import DirectLabelColormap

        colours = overlay_color_dict()
        current = getattr(layer.colormap, "color_dict", None)
        if not isinstance(layer.colormap, DirectLabelColormap) or any(
            value not in current or not np.allclose(current[value], rgba) for value, rgba in colours.items()
        ):
            layer.colormap = DirectLabelColormap(color_dict=colours)

    # --- computation -------------------------------------------------------------------------
    def _layer_arrays(self):
        """The prediction's and ground truth's data, or None (after a notification)."""
        if self.pred_layer is None or self.gt_layer is None:
            return None
        pred, gt = np.asarray(self.pred_layer.data), np.asarray(self.gt_layer.data)
        try:
            check_same_shape(pred, gt, self.pred_layer.name, self.gt_layer.name)
        except CovidsegError as error:
            notify_error(error)
            self.status.setText(str(error))
            return None
        return pred, gt

    def recompute(self):
        """Recompute the overlay, per-slice Dice and volume metrics (all in a worker: the table
        says "computing..." until they arrive)."""
        layers = self._layer_arrays()
        if layers is None:
            return
        self._generation += 1
        self.volume_metrics = {"hd95_mm": None}
        self._show_volume_column()
        self.status.setText("Comparing...")
        self._start_volume_worker(*layers)
        self._set_result_buttons(True)

    def _after_edit(self):
        """After a brush stroke: the slice on screen at once, the whole volume in a worker.

        Recomputing a full-size CT (overlay, per-slice Dice, volume metrics, HD95) takes seconds,
        so only the edited slice (the one on screen) is redone in the GUI thread; the volume
        follows from a worker, and a result made stale by a newer edit is dropped.
        """
        layers = self._layer_arrays()
        if layers is None:
            return
        pred, gt = layers
        self._generation += 1
        z = self.current_slice()
        edited = compare_masks(pred[z], gt[z])  # only this slice in the GUI thread: milliseconds
        if self.overlay_layer is not None and self.overlay_layer.data.shape == pred.shape:
            self.overlay_layer.data[z] = edited.overlay
            self.overlay_layer.refresh()
        if len(self.slice_dice) == pred.shape[0]:
            self.slice_dice[z] = float(edited.slice_dice()[0])
            self.ranking = rank_worst_slices(self.slice_dice)
            self.plot.show_dice(self.slice_dice, z)
        self.update_slice_metrics()
        self.volume_metrics["hd95_mm"] = None
        self._show_volume_column()
        self._start_volume_worker(pred, gt)

    def _start_volume_worker(self, p, g):
        """One volume worker at a time: edits made while it runs are redone when it ends."""
        from napari.qt.threading import create_worker

        if self._volume_running:
            self._volume_dirty = True
            return
        self._volume_running, self._volume_dirty = True, False
        generation = self._generation
        worker = create_worker(volume_comparison, p, g, self._spacing())
        worker.yielded.connect(lambda fast, gen=generation: self._apply_volume(gen, fast))
        worker.returned.connect(lambda value, gen=generation: self._hd95_done(gen, value))
        worker.errored.connect(lambda error, gen=generation: self._hd95_failed(gen, error))
        worker.finished.connect(self._volume_worker_finished)
        self._hd95_worker = worker
        worker.start()

    def _volume_worker_finished(self):
        self._volume_running = False
        if self._volume_dirty and self.pred_layer is not None:
            layers = self._layer_arrays()
            if layers is not None:
                self._start_volume_worker(*layers)

    def _apply_volume(self, generation: int, fast):
        """Show a :class:`VolumeResult` (overlay, per-slice Dice, volume ratios) unless it is stale."""
        if generation != self._generation or self.pred_layer is None:
            return
        self._ensure_overlay(fast.overlay)
        self.slice_dice = np.asarray(fast.slice_dice, dtype=float)
        self.ranking = rank_worst_slices(self.slice_dice)
        self.volume_metrics = dict(fast.ratios)
        self.volume_metrics["hd95_mm"] = None if fast.both_present else float("nan")
        self.update_slice_metrics()
        self.plot.show_dice(self.slice_dice, self.current_slice())
        self._show_volume_column()
        self.status.setText(
            f"{self.pred_layer.name} vs {self.gt_layer.name}: {len(self.ranking)} slices hold foreground; "
            f"volume Dice {format_metric('dice', self.volume_metrics['dice'])}."
        )

    def _hd95_done(self, generation: int, value):
        if generation != self._generation:
            return
        value = float(value)
        self.volume_metrics["hd95_mm"] = value if math.isfinite(value) else float("nan")
        self._show_volume_column()

    def _hd95_failed(self, generation: int, error):
        if generation != self._generation:
            return
        self.volume_metrics["hd95_mm"] = float("nan")
        self._show_volume_column()
        notify_error(f"HD95 could not be computed: {error}")

    def hd95_pending(self) -> bool:
        """True until the volume column (HD95 last) matches the layers' current data."""
        return self.volume_metrics.get("hd95_mm", 0.0) is None or self._volume_running

    def current_slice(self) -> int:
        layer = self.pred_layer
        if layer is None:
            return int(self.viewer.dims.current_step[0]) if self.viewer.dims.ndim else 0
        return current_slice(self.viewer, layer)

    def update_slice_metrics(self):
        """Fill the "This slice" column for the slice on screen."""
        if self.pred_layer is None or self.gt_layer is None:
            return
        z = self.current_slice()
        pred, gt = np.asarray(self.pred_layer.data), np.asarray(self.gt_layer.data)
        if pred.shape != gt.shape or not (0 <= z < pred.shape[0]):
            return
        self.slice_values = region_metrics(pred[z], gt[z], self._spacing()[1:], with_hd95=True)
        self.table.horizontalHeaderItem(0).setText(f"Slice {z}")
        for row, (key, _) in enumerate(METRIC_COLUMNS):
            self.table.item(row, 0).setText(format_metric(key, self.slice_values.get(key, float("nan"))))

    def _show_volume_column(self):
        for row, (key, _) in enumerate(METRIC_COLUMNS):
            self.table.item(row, 1).setText(format_metric(key, self.volume_metrics.get(key, float("nan"))))

    # --- events ------------------------------------------------------------------------------
    def _on_step(self, event=None):
        if self.pred_layer is None:
            return
        self.update_slice_metrics()
        self.plot.move_marker(self.current_slice())

    def _on_layer_removed(self, event):
        layer = event.value
        self.display.forget(layer)
        if layer is self.overlay_layer:
            self.overlay_layer = None
        if layer is self.pred_layer or layer is self.gt_layer:
            self.display.restore()
            self._edits.stop()
            self._edits.watch([])
            self.pred_layer = self.gt_layer = None
            self._generation += 1
            self._set_result_buttons(False)
            self.status.setText(f"'{layer.name}' was removed: pick the layers again and press Compare.")

    # --- navigation --------------------------------------------------------------------------
    def go_to_slice(self, z: int):
        if self.pred_layer is None:
            return
        z = int(np.clip(z, 0, self.pred_layer.data.shape[0] - 1))
        go_to_slice(self.viewer, self.pred_layer, z)

    def go_to_worst(self):
        if not len(self.ranking):
            self.status.setText("No slice holds foreground in either mask: there is no worst slice.")
            return
        self.rank_position = 0
        self._go_to_ranked()

    def go_to_next_worst(self):
        self._step_worst(+1)

    def go_to_previous_worst(self):
        self._step_worst(-1)

    def _step_worst(self, step: int):
        if not len(self.ranking):
            self.status.setText("No slice holds foreground in either mask: there is no worst slice.")
            return
        start = -1 if step > 0 else 0
        position = self.rank_position if self.rank_position >= 0 else start
        self.rank_position = (position + step) % len(self.ranking)
        self._go_to_ranked()

    def _go_to_ranked(self):
        z = int(self.ranking[self.rank_position])
        self.go_to_slice(z)
        self.status.setText(
            f"Worst slice #{self.rank_position + 1} of {len(self.ranking)}: slice {z}, "
            f"Dice {format_metric('dice', self.slice_dice[z])}."
        )

    # --- export ------------------------------------------------------------------------------
    def _report_inputs(self):
        if self.pred_layer is None or self.gt_layer is None:
            raise CovidsegError("Press Compare first: there are no metrics to export yet.")
        layers = self._layer_arrays()  # the worker finds the foreground (any non-zero voxel)
        if layers is None:
            raise CovidsegError("The compared layers no longer have the same shape: press Compare again.")
        return layers[0], layers[1], self._spacing(), dict(self.volume_metrics)

    def export_csv(self, path, overwrite: bool = False) -> Path:
        """Write per-slice metrics (with per-slice HD95) and the volume summary to ``path``.

        Runs in the calling thread (scripts, tests); the button runs the same job in a worker.
        """
        slices, volume = run_comparison_report(*self._report_inputs())
        return write_comparison_csv(path, slices, volume, overwrite=overwrite)

    def export_csv_dialog(self):
        if self.pred_layer is None:
            return
        suggested = f"{overlay_name(self.pred_layer.name, self.gt_layer.name).replace(' ', '_')}_metrics.csv"
        path, _ = QFileDialog.getSaveFileName(
            self, "Export metrics as CSV", suggested, "CSV files (*.csv)", options=QFileDialog.DontConfirmOverwrite
        )
        if path:
            self.start_export(path)

    def start_export(self, path, overwrite: Optional[bool] = None):
        """Export in a worker thread with a progress bar and Cancel (per-slice HD95 is slow)."""
        path = Path(path)
        if overwrite is None:
            overwrite = False
            if path.exists():
                if not ask_overwrite(self, path):
                    return None
                overwrite = True
        try:
            inputs = self._report_inputs()
        except CovidsegError as error:
            notify_error(error)
            return None
        self._export_target = (path, overwrite)
        self.export_button.setEnabled(False)
        return self.runner.start(run_comparison_report, *inputs, status="Computing per-slice metrics...")

    def _export_done(self, result):
        path, overwrite = self._export_target
        slices, volume = result
        try:
            written = write_comparison_csv(path, slices, volume, overwrite=overwrite)
        except (CovidsegError, OSError) as error:
            notify_error(error)
            self.status.setText(str(error))
        else:
            self.status.setText(f"Metrics written to {written}")

    def _export_finished(self):
        self.runner.setVisible(False)
        self.export_button.setEnabled(self.pred_layer is not None)
        self._export_target = None

    def export_running(self) -> bool:
        return self.runner.is_running()
