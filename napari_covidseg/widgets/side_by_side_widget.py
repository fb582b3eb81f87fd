"""Side-by-side dock widget: run several networks on one CT and look at their masks in a grid.

napari's grid mode gives every (group of) layer(s) its own tile while keeping one set of dims and
one camera, so scrolling slices, panning and zooming stay synchronised across tiles.  To make each
tile show "CT + one network's mask", the widget adds, per network, a CT layer that shares the
CT's array (no copy) and the network's mask directly above it, and sets the grid stride to 2 so
the pair shares a tile.  The grid is filled from the top of the layer list (negative stride), the
widget's layers are put on top in the order of the networks, and every other layer is hidden
while the grid is on (hidden layers take no tile); "Leave grid mode" removes the widget's layers
and restores the visibility and grid settings that were there before.

With a ground-truth layer, the first tile shows the ground truth (in its reference colour) and every network tile
is named with its Dice; the table lists Dice, IoU, sensitivity, specificity, precision, HD95 and
run time per network (all from :mod:`napari_covidseg.metrics`, as in the Compare widget).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..errors import CancelledError, InputError
from ..models.registry import get_network, network_names
from .common import (
    DeviceCombo,
    INFECTION_COLOR,
    LUNG_COLOR,
    LayerComboBox,
    TaskRunner,
    add_labels_like,
    check_weights_read,
    form_layout,
    format_seconds,
    image_layers,
    labels_layers,
    layer_domain,
    layer_spacing,
    layer_spacing_known,
    notify_error,
    push_button,
    scrolling_rows,
    short_title,
    volume_of,
)
from .layer_style import reference_color
from .save_defaults import reference_score
from .weights_combo import WeightsCombo

CLASSES = ("infection", "lung")
CLASS_COLORS = {"lung": LUNG_COLOR, "infection": INFECTION_COLOR}
TILE_OPACITY = 0.6
# (row label, metric key, tooltip, higher is better): one row per metric and one column per
# network, so five networks fit a narrow dock; the best value of each row is bold
TABLE_ROWS = [
    ("Dice", "dice", "Dice similarity coefficient", True),
    ("IoU", "iou", "Intersection over union (Jaccard)", True),
    ("Sensitivity", "sensitivity", "Fraction of the ground truth found (recall)", True),
    ("Specificity", "specificity", "Fraction of the background left out", True),
    ("Precision", "precision", "Fraction of the prediction that is right", True),
    ("HD95 (mm)", "hd95_mm", "95th percentile Hausdorff distance (— when a mask is empty)", False),
    ("Time (s)", "seconds", "Time to load the weights and segment the CT", False),
]
SIDE_BY_SIDE_KEY = "covidseg_side_by_side"


@dataclass
class Job:
    network: str
    weights_path: str


@dataclass
class NetworkResult:
    network: str
    title: str
    weights_path: str
    mask: np.ndarray  # uint8 0/1, the chosen class
    metrics: Optional[Dict[str, float]]
    seconds: float
    device: str


def run_networks(jobs: List[Job], ct: np.ndarray, spacing, cls: str, gt: Optional[np.ndarray], threshold: float,
                 device: str, progress=None, should_cancel=None, report=None, domain: str = "hu") -> List[NetworkResult]:
    """Run every job one after the other (worker thread; no Qt).  Progress is in thousandths of
    the whole run; ``report(text)`` says which network is running."""
    from ..checkpoint import load_checkpoint
    from ..inference import resolve_device, segment_volume
    from ..metrics import all_metrics
    from .segment_widget import describe_device

    dev = resolve_device(device)
    channel = 0 if cls == "lung" else 1
    results = []
    n = len(jobs)
    for k, job in enumerate(jobs):
        if should_cancel is not None and should_cancel():
            raise CancelledError("cancelled")
        title = get_network(job.network).title
        if report is not None:
            report(f"Running {title} ({k + 1}/{n})...")
        t0 = time.perf_counter()
        loaded = load_checkpoint(job.weights_path, expected_network=job.network, map_location="cpu")

        def part(done, total, k=k):
            if progress is not None:
                progress(int(1000 * (k + min(done, total) / max(total, 1)) / n), 1000)

        seg = segment_volume(loaded, ct, spacing, threshold=threshold, device=dev, progress=part,
                             should_cancel=should_cancel, domain=domain, probabilities=gt is not None)
        seconds = time.perf_counter() - t0
        mask = seg.lung if channel == 0 else seg.infection
        metrics = None
        if gt is not None:
            if report is not None:
                report(f"Scoring {title} against the ground truth ({k + 1}/{n})...")
            metrics = all_metrics(mask, gt, spacing=spacing, prob=seg.probabilities[channel])
        results.append(NetworkResult(job.network, title, job.weights_path, mask, metrics, seconds, describe_device(dev)))
        del seg
    return results


def format_metric(value, key: str = "dice") -> str:
    """3 decimals for ratios, 0.1 for HD95 (mm or px) and seconds, "—" when undefined."""
    if value is None:
        return "—"
    value = float(value)
    if not math.isfinite(value):
        return "—"
    return f"{value:.1f}" if key in ("hd95_mm", "seconds") else f"{value:.3f}"


def result_value(result: "NetworkResult", key: str) -> Optional[float]:
    return result.seconds if key == "seconds" else (result.metrics or {}).get(key)


def default_networks(weights: Dict[str, "WeightsCombo"]) -> List[str]:
    """What is ticked at first: the U-Net baseline and the network whose weights report the best
    infection Dice (held-out test, else validation): two runs, not five."""
    from ..weights_catalog import best_infection_dice

    available = [name for name, combo in weights.items() if combo.current_path()]
    picks = [name for name in available if name == "unet"]
    scored = [(best_infection_dice(weights[name].current_entry().info), name) for name in available if name not in picks]
    scored = [(dice, name) for dice, name in scored if dice is not None] or [(0.0, n) for _, n in scored[:1]]
    if scored:
        picks.append(max(scored)[1])
    return picks


def tile_name(result: NetworkResult, cls: str) -> str:
    """The tile's title (its mask layer's name): the network and its Dice, or without a ground
    truth the network and the class.  Short, to fit a tile a quarter of the canvas wide (every
    tile shows the class chosen under Compare)."""
    if result.metrics is not None and math.isfinite(result.metrics.get("dice", float("nan"))):
        return f"{result.network} — Dice {result.metrics['dice']:.2f}"
    return f"{result.network} {cls}"


class SideBySideWidget(QWidget):
    """Choose networks, CT and optional ground truth; Run shows one tile per network."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.results: List[NetworkResult] = []
        self.class_name = "infection"
        self._layers = []  # layers this widget added (removed by Clear)
        self._saved_state = None  # viewer state before grid mode
        self._ct_layer = None
        self._gt_layer = None

        self.ct_combo = LayerComboBox(napari_viewer, image_layers)
        self.class_combo = QComboBox()
        for cls in CLASSES:
            self.class_combo.addItem(cls.capitalize(), cls)
        self.class_combo.setToolTip("Which mask of each network to compare")
        self.infection_gt_combo = LayerComboBox(napari_viewer, labels_layers, allow_none=True,
                                                prefer=reference_score("infection"))
        self.lung_gt_combo = LayerComboBox(napari_viewer, labels_layers, allow_none=True, prefer=reference_score("lung"))
        for combo in (self.infection_gt_combo, self.lung_gt_combo):
            combo.setToolTip("Optional ground truth: with it each tile shows its Dice and the table all metrics")

        self.device_combo = DeviceCombo()
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setValue(0.5)

        networks_box = self._networks_box()

        self.run_button = push_button("Run selected networks", on_click=self.run)
        self.runner = TaskRunner(unit="%")
        self.runner.succeeded.connect(self._on_success)
        self.runner.started.connect(self._update_buttons)
        self.runner.finished.connect(self._update_buttons)

        self.table = self._make_table()
        self.export_button = push_button("Export CSV...", on_click=self._export_clicked)
        self.clear_button = push_button("Leave grid mode", "Remove the side-by-side layers and restore the viewer as it was",
                                        self.clear)

        form = form_layout([("CT:", self.ct_combo), ("Compare:", self.class_combo),
                            ("Infection GT:", self.infection_gt_combo), ("Lung GT:", self.lung_gt_combo),
                            ("Device:", self.device_combo), ("Threshold:", self.threshold_spin)])
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.clear_button)
        layout = scrolling_rows(self)
        layout.addLayout(form)
        layout.addWidget(networks_box)
        layout.addWidget(self.run_button)
        layout.addWidget(self.runner)
        layout.addWidget(QLabel("Results:"))
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        layout.addStretch(1)
        self.ct_combo.currentIndexChanged.connect(self._show_hd95_unit)
        self._show_hd95_unit()
        self._update_buttons()

    def _show_hd95_unit(self, *_) -> None:
        """HD95 in mm, or in pixels where the CT's voxel size is a placeholder (8-bit slices): of the
        CT the shown results were computed on, or of the chosen CT before any run."""
        ct = self._ct_layer if self.results else self.ct_combo.current_layer()
        known = ct is None or layer_spacing_known(ct)
        row = [r[1] for r in TABLE_ROWS].index("hd95_mm")
        self.table.verticalHeaderItem(row).setText("HD95 (mm)" if known else "HD95 (px)")

    def _networks_box(self) -> QGroupBox:
        """One row per registered network: [x] title | weights; "Add checkpoint..." below."""
        self.network_checks: Dict[str, QCheckBox] = {}
        self.network_weights: Dict[str, WeightsCombo] = {}
        networks_box = QGroupBox("Networks")
        grid = QGridLayout(networks_box)
        for row, name in enumerate(network_names()):
            spec = get_network(name)
            check = QCheckBox(short_title(spec))
            check.setToolTip(f"{spec.title}: {name} ({spec.dims}D)\n{spec.paper}")
            weights = WeightsCombo(name, browse=False)
            self.network_checks[name] = check
            self.network_weights[name] = weights
            grid.addWidget(check, row, 0)
            grid.addWidget(weights, row, 1)
        grid.setColumnStretch(1, 1)
        self.set_networks(default_networks(self.network_weights))
        self.add_checkpoint_button = push_button("Add checkpoint...", "Use a checkpoint file (.pt); it is selected in its network's row",
                                                 self._browse_checkpoint)
        grid.addWidget(self.add_checkpoint_button, len(self.network_checks), 1, Qt.AlignRight)
        return networks_box

    # --- choices -------------------------------------------------------------------------------
    def set_networks(self, names) -> None:
        for name, check in self.network_checks.items():
            check.setChecked(name in names)

    def set_class(self, cls: str) -> None:
        self.class_combo.setCurrentIndex(self.class_combo.findData(cls))

    def set_device(self, value: str) -> None:
        self.device_combo.set_device(value)

    def _browse_checkpoint(self):
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.use_checkpoint(path)

    def use_checkpoint(self, path):
        """Register ``path`` in the catalog, select it in its network's row and tick that row."""
        from .. import weights_catalog
        from ..errors import CovidsegError

        try:
            entry = weights_catalog.add_checkpoint(path)
        except CovidsegError as exc:
            notify_error(exc)
            return None
        weights = self.network_weights.get(entry.network)
        if weights is None:
            notify_error(f"The checkpoint is for `{entry.network}`, which is not listed here.")
            return None
        weights.select_path(entry.path)
        self.network_checks[entry.network].setChecked(True)
        return entry

    def _update_buttons(self, *_):
        running = self.runner.is_running()
        self.run_button.setEnabled(not running)
        self.export_button.setEnabled(bool(self.results) and not running)
        self.clear_button.setEnabled(bool(self._layers) and not running)

    def gt_layer(self):
        combo = self.lung_gt_combo if self.class_combo.currentData() == "lung" else self.infection_gt_combo
        return combo.current_layer()

    # --- running -------------------------------------------------------------------------------
    def jobs(self, domain: str = "hu") -> List[Job]:
        jobs = []
        for name, check in self.network_checks.items():
            if not check.isChecked():
                continue
            path = self.network_weights[name].current_path()
            if not path:
                raise InputError(f"`{name}` has no weights: train it, use Add checkpoint..., or untick it.")
            check_weights_read(self.network_weights[name].current_entry(), domain, name)
            jobs.append(Job(name, path))
        if not jobs:
            raise InputError("Tick at least one network to run.")
        return jobs

    def run(self):
        if self.runner.is_running():
            return None
        try:
            ct_layer = self.ct_combo.current_layer()
            ct = volume_of(ct_layer, "CT")
            domain = layer_domain(ct_layer)
            jobs = self.jobs(domain)
            cls = self.class_combo.currentData()
            gt_layer = self.gt_layer()
            gt = None
            if gt_layer is not None:
                gt = np.asarray(gt_layer.data)
                if gt.shape != ct.shape:
                    raise InputError(
                        f"The ground truth '{gt_layer.name}' has shape {gt.shape} but the CT '{ct_layer.name}' has "
                        f"{ct.shape}; choose the ground truth of this CT."
                    )
            from ..inference import resolve_device

            device = self.device_combo.device()
            resolve_device(device)
        except InputError as exc:
            notify_error(exc)
            self.runner.set_status(str(exc))
            return None
        self._ct_layer = ct_layer
        self._gt_layer = gt_layer
        self.class_name = cls
        return self.runner.start(run_networks, jobs, ct, layer_spacing(ct_layer), cls, gt,
                                 float(self.threshold_spin.value()), device, report=self.runner.post_status,
                                 domain=domain, status="Running the selected networks...")

    def cancel(self):
        self.runner.cancel()

    def _on_success(self, results: List[NetworkResult]):
        self.results = results
        self.show_grid(results)
        self.fill_table(results)
        total = sum(r.seconds for r in results)
        device = results[0].device if results else "?"
        self.runner.set_status(f"{len(results)} network(s) in {format_seconds(total)} on {device}.")
        self._update_buttons()

    # --- grid ----------------------------------------------------------------------------------
    def _save_viewer_state(self):
        if self._saved_state is None:
            grid = self.viewer.canvas.grid
            self._saved_state = {
                "visible": {id(layer): (layer, layer.visible) for layer in self.viewer.layers},
                "grid": (grid.enabled, grid.stride, tuple(grid.shape)),
            }

    def _remove_own_layers(self):
        for layer in self._layers:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._layers = []

    def _ct_copy(self, ref, name):
        """A CT layer that shares ``ref``'s array (no copy) for one tile."""
        from .common import _copy_placement

        layer = self.viewer.add_image(ref.data, name=name, colormap=ref.colormap.name,
                                      contrast_limits=tuple(ref.contrast_limits), gamma=ref.gamma,
                                      **_copy_placement(ref))
        layer.metadata[SIDE_BY_SIDE_KEY] = True
        return layer

    def _mask_layer(self, data, name, color):
        layer = add_labels_like(self.viewer, data, name, self._ct_layer, color=color, opacity=TILE_OPACITY, replace=False)
        layer.metadata[SIDE_BY_SIDE_KEY] = True
        layer.name_overlay.visible = True
        layer.name_overlay.font_size = 10
        layer.name_overlay.box = True
        return layer

    def show_grid(self, results: List[NetworkResult]):
        """Put (CT, mask) pairs on top of the layer list, hide the rest, turn the grid on."""
        self._remove_own_layers()
        self._save_viewer_state()
        ref = self._ct_layer
        pairs = []
        if self._gt_layer is not None:
            gt_name = "ground truth"
            pairs.append((self._ct_copy(ref, f"CT · {gt_name}"),
                          # a copy: a stray brush stroke in the tile must not change the real ground truth
                          self._mask_layer(np.array(self._gt_layer.data, copy=True), gt_name,
                                           reference_color(self.class_name))))
        for result in results:
            pairs.append((self._ct_copy(ref, f"CT · {result.network}"),
                          self._mask_layer(result.mask, tile_name(result, self.class_name), CLASS_COLORS[self.class_name])))
        own = [layer for pair in pairs for layer in pair]
        self._layers = own
        for layer in self.viewer.layers:
            if layer not in own:
                layer.visible = False
        # the first pair must end on top: move pairs to the top in reverse order, CT below its mask
        for ct_copy, mask in reversed(pairs):
            for layer in (ct_copy, mask):
                self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        grid = self.viewer.canvas.grid
        grid.stride = -2
        grid.shape = (-1, -1)
        grid.enabled = True
        self.viewer.reset_view()
        self._update_buttons()

    def clear(self):
        """Remove the side-by-side layers and restore visibility and grid settings."""
        self._remove_own_layers()
        state, self._saved_state = self._saved_state, None
        if state is not None:
            for layer, visible in state["visible"].values():
                if layer in self.viewer.layers:
                    layer.visible = visible
            grid = self.viewer.canvas.grid
            enabled, stride, shape = state["grid"]
            grid.stride = stride
            grid.shape = shape
            grid.enabled = enabled
        else:
            self.viewer.canvas.grid.enabled = False
        self.viewer.reset_view()
        self._update_buttons()

    # --- table ---------------------------------------------------------------------------------
    def _make_table(self) -> QTableWidget:
        table = QTableWidget(len(TABLE_ROWS), 0)
        table.setVerticalHeaderLabels([row[0] for row in TABLE_ROWS])
        for r, (_, _, tip, _) in enumerate(TABLE_ROWS):
            table.verticalHeaderItem(r).setToolTip(tip)
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        table.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        table.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        table.setToolTip("Metrics of the chosen class against the ground truth, one column per network; "
                         "the best of each row in bold")
        self._fit_table_height(table)
        return table

    @staticmethod
    def _fit_table_height(table) -> None:
        """Every row visible without a scroll bar (the header may hold two lines)."""
        header = max(table.horizontalHeader().sizeHint().height(), table.fontMetrics().height() + 8)
        table.setFixedHeight(header + table.verticalHeader().length() + 2 * table.frameWidth() + 2)

    def cell(self, key: str, network: str) -> str:
        """The table text of metric ``key`` for ``network`` (tests, scripting)."""
        row = [r[1] for r in TABLE_ROWS].index(key)
        column = [r.network for r in self.results].index(network)
        return self.table.item(row, column).text()

    def fill_table(self, results):
        from qtpy.QtGui import QFont

        self._show_hd95_unit()
        self.table.setColumnCount(len(results))
        self.table.setHorizontalHeaderLabels([short_title(get_network(r.network)).replace(" ", "\n") for r in results])
        for c, result in enumerate(results):
            self.table.horizontalHeaderItem(c).setToolTip(f"{result.title}\n{result.weights_path}")
        for r, (_, key, _, higher) in enumerate(TABLE_ROWS):
            values = [result_value(result, key) for result in results]
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            best = (max(finite) if higher else min(finite)) if len(finite) > 1 else None
            for c, value in enumerate(values):
                item = QTableWidgetItem(format_metric(value, key))
                item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                if best is not None and value is not None and float(value) == best:
                    font = QFont(item.font())
                    font.setBold(True)
                    item.setFont(font)
                self.table.setItem(r, c, item)
        self._fit_table_height(self.table)

    def export_csv(self, path) -> None:
        """Write the table (raw values, full precision) to ``path``."""
        keys = [key for _, key, _, _ in TABLE_ROWS]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["network", "class", "weights"] + keys)
            for result in self.results:
                values = []
                for key in keys:
                    value = result_value(result, key)
                    values.append("" if value is None or not math.isfinite(float(value)) else repr(float(value)))
                writer.writerow([result.network, self.class_name, result.weights_path] + values)

    def _export_clicked(self):
        if not self.results:
            notify_error("Run the networks first; there is nothing to export yet.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", "side_by_side_metrics.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            self.export_csv(path)
        except OSError as exc:
            notify_error(f"Cannot write {path}: {exc.strerror or exc}")
            return
        self.runner.set_status(f"Metrics written to {path}.")
