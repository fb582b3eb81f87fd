"""Segment dock widget: run one network on the chosen CT and add its lung and infection masks.

The chosen weights' model card (what they were trained on, what they read, their held-out
figures, "not validated on patient CT" where true) sits under the weights; every result is
checked for plausibility (:mod:`result_checks`) and what is wrong is shown in the widget, and the
optional clean-ups (lung inside the body, largest lung components, smallest lesion) run in the
worker with the network.

The work (loading the checkpoint, running the network slice by slice or patch by patch) happens
in a worker thread, so the viewer stays usable; the progress bar counts batches of slices (2D
networks) or patches (3D networks) and Cancel stops between two of them.  Results land as
Labels layers ``<network> lung`` / ``<network> infection`` on the CT's grid (scale, translate and
geometry metadata copied from the CT, so "Correct and save" writes them with the CT's affine);
running again replaces those layers' data rather than stacking duplicates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QWidget,
)

from ..errors import InputError
from ..intensity import HU
from ..models.registry import get_network, network_names
from .common import (
    DeviceCombo,
    INFECTION_COLOR,
    LUNG_COLOR,
    LayerComboBox,
    MASK_OPACITY,
    TaskRunner,
    add_image_like,
    add_labels_like,
    check_weights_read,
    compact_combo,
    form_layout,
    format_seconds,
    image_layers,
    layer_domain,
    layer_spacing,
    layer_spacing_known,
    notify_error,
    notify_info,
    notify_warning,
    push_button,
    scrolling_rows,
    volume_of,
)
from .edits import EDITED_KEY, is_edited, watch_edits  # noqa: F401 (EDITED_KEY: part of this module's API)
from .model_card_view import WARNING_STYLE, ModelCardView
from .result_checks import PostProcessing, body_mask, check_result, postprocess
from .weights_combo import WeightsCombo

CLASS_COLORS = {"lung": LUNG_COLOR, "infection": INFECTION_COLOR}
#: the smallest lesion the clean-up keeps by default, in mL (where the spacing is real)
DEFAULT_MIN_LESION_ML = 0.1


def mask_layer_name(network: str, cls: str) -> str:
    return f"{network} {cls}"


def probability_layer_name(network: str, cls: str) -> str:
    return f"{network} {cls} probability"


@dataclass
class RunRequest:
    """Everything a run needs, read from the widget in the GUI thread."""

    ct: np.ndarray
    spacing: tuple
    network: str
    weights_path: str
    device: str
    threshold: float
    domain: str = HU
    spacing_known: bool = True
    cleanup: PostProcessing = PostProcessing()
    probabilities: bool = False  # keep the probability maps (float16) for layers


@dataclass
class RunOutcome:
    request: RunRequest
    result: object  # inference.SegmentationResult (lung and infection after the clean-up)
    device_used: str
    seconds: float
    n_slices: int
    findings: tuple = ()  # result_checks.Finding, what is implausible about the result


def run_segmentation(request: RunRequest, progress=None, should_cancel=None) -> RunOutcome:
    """Load the weights and segment (runs in the worker thread; no Qt here)."""
    from ..checkpoint import load_checkpoint
    from ..inference import resolve_device, segment_volume

    t0 = time.perf_counter()
    device = resolve_device(request.device)
    loaded = load_checkpoint(request.weights_path, expected_network=request.network, map_location="cpu")
    result = segment_volume(loaded, request.ct, request.spacing, threshold=request.threshold, device=device,
                            progress=progress, should_cancel=should_cancel, domain=request.domain,
                            probabilities=request.probabilities)
    findings = check_and_clean(result, request)
    return RunOutcome(request=request, result=result, device_used=describe_device(device),
                      seconds=time.perf_counter() - t0, n_slices=int(request.ct.shape[0]), findings=tuple(findings))


def check_and_clean(result, request: RunRequest) -> list:
    """Apply the clean-up to ``result``'s masks (in place), then check them (worker thread)."""
    body = body_mask(request.ct, request.domain)
    if request.cleanup.active:
        result.lung, result.infection = postprocess(result.lung, result.infection, body, request.cleanup,
                                                    request.spacing, request.spacing_known)
    return check_result(result.lung, result.infection, body, request.spacing, request.spacing_known)


def describe_device(device) -> str:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "CPU"


def check_hounsfield(ct: np.ndarray, name: str) -> Optional[str]:
    """A warning when the image does not look like a CT in Hounsfield units (networks expect HU)."""
    sample = ct[:: max(1, ct.shape[0] // 8)]
    low, high = float(np.min(sample)), float(np.max(sample))
    if high <= 1.5 and low >= -1.5:
        return (f"'{name}' holds values between {low:.2f} and {high:.2f}; the networks expect Hounsfield units "
                "(air about -1000). Open the original CT (NIfTI) rather than a normalised image.")
    if low >= 0 and high > 1000:
        return (f"'{name}' has no negative values (min {low:.0f}); it may be stored without the rescale "
                "intercept (HU = value - 1024). Results may be poor.")
    return None


def result_sizes(outcome: RunOutcome) -> str:
    """Lung and infection size: mL where the spacing is real, voxels (and a note) where it is a placeholder."""
    result, request = outcome.result, outcome.request
    lung, infection = int(result.lung.sum()), int(result.infection.sum())
    if request.spacing_known:
        voxel_ml = float(np.prod(request.spacing)) / 1000.0
        sizes = f"Lung {lung * voxel_ml:.0f} mL, infection {infection * voxel_ml:.1f} mL"
    else:
        sizes = f"Lung {lung} voxels, infection {infection} voxels (spacing unknown: no mL)"
    share = f", {100.0 * infection / lung:.1f}% of the lung" if lung else ""
    return f"{sizes}{share} (threshold {request.threshold:.2f})."


class SegmentWidget(QWidget):
    """Choose CT, network, weights, device and threshold; Run adds the masks to the viewer."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_outcome: Optional[RunOutcome] = None
        self._ct_layer = None

        self.ct_combo = LayerComboBox(napari_viewer, image_layers)
        self.ct_combo.setToolTip("The chest CT to segment (Image layer: a CT in HU or an 8-bit display image)")
        self.network_combo = compact_combo(QComboBox())
        for name in network_names():
            spec = get_network(name)
            self.network_combo.addItem(spec.title, name)
            self.network_combo.setItemData(self.network_combo.count() - 1,
                                           f"{spec.name}: {spec.dims}D network\n{spec.paper}", Qt.ToolTipRole)
        self.network_combo.currentIndexChanged.connect(self._network_changed)
        self.weights = WeightsCombo(self.network)
        self.weights.changed.connect(self._weights_changed)
        self.weights.other_network.connect(self._switch_to_checkpoint)
        self.card = self.weights_info = ModelCardView()
        self.device_combo = DeviceCombo()
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.5)
        self.threshold_spin.setToolTip("A voxel belongs to a mask when its probability is above this")
        self.probability_check = QCheckBox("Add probability maps")
        self.probability_check.setToolTip("Also add the lung and infection probabilities (0..1) as image layers")
        self.run_button = push_button("Run", "Segment the CT with the chosen network", self.run)
        self.runner = TaskRunner(unit="steps")
        self.runner.succeeded.connect(self._on_success)
        self.runner.finished.connect(self._update_buttons)
        self.runner.started.connect(self._update_buttons)
        self.runner.cancelled.connect(self._on_cancelled)
        self._closed_ct = None  # name of the CT closed while it was segmented
        self.findings_label = QLabel()
        self.findings_label.setWordWrap(True)
        self.findings_label.setStyleSheet(WARNING_STYLE)
        self.findings_label.setVisible(False)
        self._lay_out()
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        self._weights_changed()
        self._update_buttons()

    def _lay_out(self):
        top = form_layout([("CT:", self.ct_combo), ("Network:", self.network_combo), ("Weights:", self.weights)])
        bottom = form_layout([("Device:", self.device_combo), ("Threshold:", self.threshold_spin),
                              ("", self.probability_check)])
        layout = scrolling_rows(self)
        layout.addLayout(top)
        layout.addWidget(self.card)
        layout.addLayout(bottom)
        layout.addWidget(self._cleanup_box())
        layout.addWidget(self.run_button)
        layout.addWidget(self.runner)
        layout.addWidget(self.findings_label)
        layout.addStretch(1)

    def _cleanup_box(self) -> QGroupBox:
        box = QGroupBox("Clean-up (optional)")
        box.setToolTip("Applied to the masks after the network; see the README (Segment) for what each does")
        self.body_check = QCheckBox("Keep lung inside the body")
        self.body_check.setToolTip("Remove lung voxels outside the patient (body: denser than air, largest component)")
        self.components_check = QCheckBox("Keep the largest lung components")
        self.components_check.setToolTip("Keep the two lungs (largest 3D components), drop specks elsewhere")
        self.min_lesion_spin = QDoubleSpinBox()
        self.min_lesion_spin.setRange(0.0, 100.0)
        self.min_lesion_spin.setDecimals(2)
        self.min_lesion_spin.setSingleStep(0.05)
        self.min_lesion_spin.setSuffix(" mL")
        self.min_lesion_spin.setSpecialValueText("keep all")
        self.min_lesion_spin.setToolTip("Remove infection components smaller than this (0: keep all). Where the voxel "
                                        "size is a placeholder, 1 mL means 1000 voxels.")
        form = QFormLayout(box)
        form.addRow(self.body_check)
        form.addRow(self.components_check)
        form.addRow("Smallest lesion:", self.min_lesion_spin)
        return box

    def cleanup_options(self) -> PostProcessing:
        return PostProcessing(lung_in_body=self.body_check.isChecked(), lung_components=self.components_check.isChecked(),
                              min_lesion_ml=float(self.min_lesion_spin.value()))

    # --- choices -------------------------------------------------------------------------------
    @property
    def network(self) -> Optional[str]:
        return self.network_combo.currentData()

    def set_network(self, name: str) -> None:
        index = self.network_combo.findData(name)
        if index >= 0:
            self.network_combo.setCurrentIndex(index)

    def set_device(self, value: str) -> None:
        self.device_combo.set_device(value)

    def _network_changed(self, *_):
        self.weights.set_network(self.network)
        self._weights_changed()

    def _switch_to_checkpoint(self, entry):
        self.set_network(entry.network)
        self.weights.select_path(entry.path)

    def _weights_changed(self, *_):
        self.card.show_entry(self.weights.current_entry())
        self._update_buttons()

    def _update_buttons(self, *_):
        running = self.runner.is_running()
        self.run_button.setEnabled(not running)
        for widget in (self.network_combo, self.weights, self.device_combo, self.threshold_spin, self.ct_combo):
            widget.setEnabled(not running)

    # --- running -------------------------------------------------------------------------------
    def request(self) -> RunRequest:
        """Read and check the choices (raises :class:`InputError` with what to fix)."""
        layer = self.ct_combo.current_layer()
        ct = volume_of(layer, "CT")
        if self.network is None:
            raise InputError("No network is registered.")
        path = self.weights.current_path()
        if not path:
            raise InputError(
                f"There are no weights for `{self.network}`: train it in the Train widget or use Browse... to pick a checkpoint."
            )
        from ..inference import resolve_device

        device = self.device_combo.device()
        resolve_device(device)  # fail now, in the GUI thread, with the reason
        domain = layer_domain(layer)
        check_weights_read(self.weights.current_entry(), domain, self.network)
        self._ct_layer = layer
        return RunRequest(ct=ct, spacing=layer_spacing(layer), network=self.network, weights_path=path,
                          device=device, threshold=float(self.threshold_spin.value()), domain=domain,
                          spacing_known=layer_spacing_known(layer), cleanup=self.cleanup_options(),
                          probabilities=self.probability_check.isChecked())

    def run(self):
        if self.runner.is_running():
            return None
        try:
            request = self.request()
        except InputError as exc:
            notify_error(exc)
            self.runner.set_status(str(exc))
            return None
        warning = check_hounsfield(request.ct, self._ct_layer.name) if request.domain == HU else None
        if warning:
            notify_warning(warning)
        self.findings_label.setVisible(False)
        self._closed_ct = None
        return self.runner.start(run_segmentation, request,
                                 status=f"Segmenting '{self._ct_layer.name}' with {request.network}...")

    def cancel(self):
        self.runner.cancel()

    def _on_layer_removed(self, event):
        """The CT of a running segmentation was closed: stop, and drop the result when it comes."""
        if event.value is self._ct_layer and self.runner.is_running():
            self._closed_ct = event.value.name
            self.runner.cancel()

    def _on_cancelled(self):
        if self._closed_ct is not None:
            self.runner.set_status(f"'{self._closed_ct}' was closed while it was segmented: the run was stopped "
                                   "and nothing was added.")

    def _on_success(self, outcome: RunOutcome):
        if self._ct_layer is None or self._ct_layer not in self.viewer.layers:
            # adding layers on the grid of a CT that napari has already torn down can crash it
            self.runner.set_status("The CT was closed while it was segmented; the result was dropped.")
            return
        self.last_outcome = outcome
        self.add_result_layers(outcome)
        cleanup = outcome.request.cleanup
        self.runner.set_status(
            f"{outcome.request.network}: {outcome.n_slices} slices in {format_seconds(outcome.seconds)} on {outcome.device_used}.\n"
            + result_sizes(outcome) + (f"\nClean-up: {cleanup.describe()}." if cleanup.active else ""))
        self.show_findings(outcome.findings)

    def show_findings(self, findings) -> None:
        """Warnings in the widget (and as a notification); notes in the widget only."""
        self.findings_label.setText("\n".join(("\u26a0 " if f.level == "warning" else "") + f.text for f in findings))
        self.findings_label.setVisible(bool(findings))
        warnings = [f.text for f in findings if f.level == "warning"]
        if warnings:
            notify_warning("Check this result: " + " ".join(warnings))

    def _free_name(self, base: str) -> str:
        """``base`` unless that layer holds hand edits; then the first ``base (k)`` that is free or
        unedited, so re-running never overwrites a corrected mask."""
        candidates = [base] + [f"{base} ({k})" for k in range(2, 1000)]
        for name in candidates:
            if name not in self.viewer.layers or not is_edited(self.viewer.layers[name]):
                return name
        return base  # pragma: no cover

    def add_result_layers(self, outcome: RunOutcome):
        """Add or refresh ``<net> lung``/``<net> infection`` (and the probability maps if asked).

        A result layer the user has edited (paint, fill, erase; not undone) is kept: the new
        result goes to ``<net> lung (2)`` and a notification says so.
        """
        ref = self._ct_layer
        network = outcome.request.network
        result = outcome.result
        layers = []
        for cls, mask in (("lung", result.lung), ("infection", result.infection)):
            base = mask_layer_name(network, cls)
            name = self._free_name(base)
            if name != base:
                notify_info(f"'{base}' has your edits, so it was kept; the new result is '{name}'.")
            layer = add_labels_like(self.viewer, mask, name, ref, color=CLASS_COLORS[cls], opacity=MASK_OPACITY)
            layer.metadata["covidseg_source"] = {"network": network, "weights": outcome.request.weights_path,
                                                 "threshold": outcome.request.threshold, "class": cls}
            watch_edits(layer)
            layers.append(layer)
        if result.probabilities is not None:
            for channel, cls in enumerate(("lung", "infection")):
                add_image_like(self.viewer, result.probabilities[channel], probability_layer_name(network, cls), ref,
                               colormap="inferno", blending="additive", contrast_limits=(0.0, 1.0), opacity=0.6,
                               visible=cls == "infection")
        # keep the masks on top so they are not hidden under the probability maps
        for layer in layers:
            self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        self.viewer.layers.selection.active = layers[-1]
        return layers
