"""Helpers shared by every dock widget: errors as notifications, layer lists, derived layers, and
a progress + cancel row that runs long work off the GUI thread.

Why one module: every widget must treat errors the same way (a :class:`CovidsegError` is shown as
its own text, anything else as a one-line message, never a traceback), must put derived layers
on the CT's grid (same ``scale``, ``translate`` and geometry metadata, so saving writes the CT's
affine), and must keep the viewer responsive while a network runs.  Doing each once here keeps
the widgets small and their behaviour consistent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
from qtpy.QtCore import QEvent, QObject, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..errors import CancelledError, CovidsegError, InputError
from ..intensity import DISPLAY8, DOMAIN_KEY, DOMAINS, HU, looks_like_display8
from ..io.geometry import GEOMETRY_KEY, SPACING_KNOWN_KEY, Geometry
from ._review import LayerCombo

LOG = logging.getLogger("napari_covidseg")

# A drop-down of the viewer's layers of one kind, kept current as layers come and go
# (``LayerComboBox(viewer, image_layers)``); one implementation shared by all widgets.
LayerComboBox = LayerCombo

# Fixed, recognisable colours of predictions (lung blue, infection orange); references differ
from .layer_style import INFECTION_COLOR, LUNG_COLOR  # noqa: E402

MASK_OPACITY = 0.5


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def error_text(exc_or_msg) -> str:
    """The message a user should read for ``exc_or_msg`` (a string or an exception).

    User errors (:class:`CovidsegError`) already say what is wrong and what to do, so their text
    is shown as is.  Anything else is a bug or an environment problem: show its type and first
    line only (the full traceback goes to the ``napari_covidseg`` logger).
    """
    if isinstance(exc_or_msg, BaseException):
        if isinstance(exc_or_msg, CovidsegError):
            return str(exc_or_msg) or type(exc_or_msg).__name__
        first = (str(exc_or_msg).strip().splitlines() or [""])[0][:300]
        if isinstance(exc_or_msg, MemoryError):
            return "Out of memory: close other layers or choose a smaller volume / the CPU device."
        return f"Unexpected error ({type(exc_or_msg).__name__}): {first}" if first else f"Unexpected error ({type(exc_or_msg).__name__})"
    return str(exc_or_msg)


def notify_error(exc_or_msg) -> None:
    """Show an error as a napari notification (never raises, never dumps a traceback)."""
    from napari.utils.notifications import show_error

    text = error_text(exc_or_msg)
    if isinstance(exc_or_msg, BaseException) and not isinstance(exc_or_msg, CovidsegError):
        LOG.debug("%s", text, exc_info=(type(exc_or_msg), exc_or_msg, exc_or_msg.__traceback__))
    show_error(text)


def notify_warning(msg) -> None:
    from napari.utils.notifications import show_warning

    show_warning(error_text(msg))


def notify_info(msg) -> None:
    from napari.utils.notifications import show_info

    show_info(str(msg))


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
def image_layers(viewer) -> List:
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image)]


def labels_layers(viewer) -> List:
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def layer_geometry(layer) -> Geometry:
    """The layer's :class:`Geometry` (from its metadata), else one made from its shape and scale.

    The fallback places the display array in standard (L, P, S) orientation with the layer's
    scale as spacing, which is what napari shows; raises :class:`InputError` for a layer that is
    not a 3D volume.
    """
    geometry = (layer.metadata or {}).get(GEOMETRY_KEY)
    if isinstance(geometry, Geometry):
        return geometry
    shape = np.shape(layer.data)
    if len(shape) != 3 or getattr(layer, "rgb", False):
        raise InputError(
            f"layer '{layer.name}' has shape {tuple(shape)}, not a 3D (z, y, x) volume; open a CT volume (NIfTI) instead"
        )
    return Geometry.from_display_spacing(shape, tuple(float(s) for s in layer.scale[-3:]))


def volume_of(layer, what: str = "CT") -> np.ndarray:
    """``layer.data`` as a 3D numpy array, or an :class:`InputError` that says what is wrong."""
    if layer is None:
        raise InputError(f"No {what} layer is chosen: open a {what} (File > Open, or File > Open Sample) and pick it.")
    if getattr(layer, "multiscale", False):
        raise InputError(f"'{layer.name}' is a multiscale image; open the CT as a plain volume.")
    if getattr(layer, "rgb", False):
        raise InputError(f"'{layer.name}' is an RGB image, not a CT volume.")
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise InputError(
            f"'{layer.name}' has {data.ndim} dimensions {tuple(data.shape)}; the networks need a 3D CT volume (z, y, x). "
            "Open the whole CT series, not a single slice."
        )
    if min(data.shape) < 1:
        raise InputError(f"'{layer.name}' is empty {tuple(data.shape)}.")
    return data


def layer_spacing(layer) -> tuple:
    """(z, y, x) voxel size in mm: napari's ``scale`` of the layer."""
    return tuple(float(s) for s in layer.scale[-3:])


def layer_spacing_known(layer) -> bool:
    """False where the layer's spacing is a placeholder (set by the reader; layers made by other
    means count as measured)."""
    return bool((getattr(layer, "metadata", None) or {}).get(SPACING_KNOWN_KEY, True))


def check_weights_read(entry, domain: str, network: str) -> None:
    """Raise (with the reason) when the weights ``entry`` cannot segment an image of ``domain``."""
    from ..preprocessing import Preprocessing

    if entry is not None:
        Preprocessing.from_dict(entry.info.get("preprocessing") or {}).check_can_read(
            domain, f"These `{network}` weights ({entry.label})")


def layer_domain(layer) -> str:
    """``"hu"`` or ``"display8"``: the reader's record, else judged from the values (8-bit data
    can never be HU: a CT always holds air at about -1000)."""
    recorded = (getattr(layer, "metadata", None) or {}).get(DOMAIN_KEY)
    if recorded in DOMAINS:
        return recorded
    data = np.asarray(layer.data)
    sample = data[:: max(1, data.shape[0] // 8)] if data.ndim == 3 else data
    return DISPLAY8 if looks_like_display8(sample) else HU


def label_colormap(color, label: int = 1):
    """A napari ``DirectLabelColormap`` that paints ``label`` in ``color`` and everything else clear."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), label: color})


def _copy_placement(ref_layer) -> dict:
    placement = {}
    if ref_layer is None:
        return placement
    placement["scale"] = tuple(ref_layer.scale)
    placement["translate"] = tuple(ref_layer.translate)
    geometry = (ref_layer.metadata or {}).get(GEOMETRY_KEY)
    if geometry is None and np.ndim(ref_layer.data) == 3:
        geometry = layer_geometry(ref_layer)
    placement["metadata"] = {GEOMETRY_KEY: geometry} if geometry is not None else {}
    for key in (SPACING_KNOWN_KEY, DOMAIN_KEY):  # derived layers keep what is known of the source
        if key in (ref_layer.metadata or {}):
            placement["metadata"][key] = ref_layer.metadata[key]
    return placement


def _add_or_update(viewer, layer_type, add, data, name: str, ref_layer, replace: bool, kwargs: dict,
                   new_layer_defaults: Optional[dict] = None):
    """Add a ``layer_type`` layer on ``ref_layer``'s grid, or give an existing one of that name,
    type and shape the new data (so re-running updates instead of stacking duplicates);
    ``new_layer_defaults`` apply only to a layer that is added."""
    placement = _copy_placement(ref_layer)
    layer = viewer.layers[name] if (replace and name in viewer.layers) else None
    if layer is not None and (not isinstance(layer, layer_type) or layer.data.shape != np.shape(data)):
        viewer.layers.remove(layer)
        layer = None
    if layer is None:
        return add(data, name=name, **placement, **{**(new_layer_defaults or {}), **kwargs})
    layer.scale = placement.get("scale", layer.scale)
    layer.translate = placement.get("translate", layer.translate)
    layer.metadata = {**(layer.metadata or {}), **placement.get("metadata", {})}
    layer.data = data
    for key, value in kwargs.items():
        setattr(layer, key, value)
    return layer


def add_labels_like(viewer, data, name: str, ref_layer, color=None, replace: bool = True, **kwargs):
    """Add (or refresh) a Labels layer ``name`` on the grid of ``ref_layer`` (usually the CT).

    The new layer gets the reference's ``scale``, ``translate`` and geometry metadata.  With
    ``replace`` an existing Labels layer of that name and shape gets the new data instead of a
    duplicate being stacked (re-running a network updates its masks).  ``color`` paints label 1.
    """
    from napari.layers import Labels

    layer = _add_or_update(viewer, Labels, viewer.add_labels, data, name, ref_layer, replace, kwargs,
                           new_layer_defaults={"opacity": MASK_OPACITY})
    if color is not None:
        layer.colormap = label_colormap(color)
    return layer


def add_image_like(viewer, data, name: str, ref_layer, replace: bool = True, **kwargs):
    """Add (or refresh) an Image layer ``name`` on the grid of ``ref_layer`` (e.g. probability maps)."""
    from napari.layers import Image

    return _add_or_update(viewer, Image, viewer.add_image, data, name, ref_layer, replace, kwargs)


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
def device_choices() -> List[tuple]:
    """``[(label, value)]`` for a device drop-down: auto, each CUDA GPU found, CPU."""
    choices = [("Auto (GPU if available)", "auto")]
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                choices.append((f"GPU {index}: {torch.cuda.get_device_name(index)}", f"cuda:{index}"))
    except Exception:  # a broken CUDA install must not break the widget; CPU still works
        LOG.debug("CUDA query failed", exc_info=True)
    choices.append(("CPU", "cpu"))
    return choices


# ------------------------------------------------------------------------------------------------
# long work: progress bar + cancel + status
# ------------------------------------------------------------------------------------------------
class _Relay(QObject):
    """Lives in the GUI thread; signals emitted from the worker arrive queued in the GUI thread."""

    progressed = Signal(int, int)
    message = Signal(str)


class TaskRunner(QWidget):
    """A progress bar, a Cancel button and a status line that run one function off the GUI thread.

    ``start(fn, *args, **kwargs)`` calls ``fn(*args, progress=..., should_cancel=..., **kwargs)``
    (``unit="%"`` shows a percentage, any other unit "done / total unit")
    in a napari thread worker.  ``progress(done, total)`` may be called from the worker (it is
    relayed to the GUI thread); ``should_cancel()`` turns true after Cancel is pressed, and the
    function is expected to raise :class:`CancelledError` then (returning normally counts as
    done).  When it ends, exactly one of the signals fires in the GUI thread:
    ``succeeded(result)``, ``cancelled()`` or ``failed(exception)`` (already shown to the user
    through :func:`notify_error`), then ``finished()``.
    """

    succeeded = Signal(object)
    cancelled = Signal()
    failed = Signal(object)
    finished = Signal()
    started = Signal()

    def __init__(self, parent=None, unit: str = "steps"):
        super().__init__(parent)
        self.unit = unit
        self.worker = None
        self._cancel_event = threading.Event()
        self._t0 = 0.0
        self.elapsed = 0.0
        self.last_error: Optional[BaseException] = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._relay.message.connect(self.set_status)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop the running work; nothing is added to the viewer")
        self.cancel_button.clicked.connect(self.cancel)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status_label)

    # --- state ---------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.worker is not None

    def should_cancel(self) -> bool:
        return self._cancel_event.is_set()

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def cancel(self) -> None:
        if self.is_running():
            self._cancel_event.set()
            self.cancel_button.setEnabled(False)
            self.set_status("Cancelling...")

    # --- running -------------------------------------------------------------------------------
    def progress(self, done: int, total: int) -> None:
        """Thread-safe: report ``done`` of ``total`` steps."""
        self._relay.progressed.emit(int(done), int(total))

    def post_status(self, text: str) -> None:
        """Thread-safe: change the status line from the worker."""
        self._relay.message.emit(str(text))

    def _on_progress(self, done: int, total: int) -> None:
        if not self.is_running():
            return
        total = max(int(total), 1)
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(min(int(done), total))
        self.progress_bar.setFormat("%p%" if self.unit == "%" else f"%v / %m {self.unit}")

    def start(self, fn: Callable, *args, status: str = "Running...", **kwargs):
        """Run ``fn`` in a worker thread; returns the worker (``None`` if already running)."""
        from napari.qt.threading import create_worker

        if self.is_running():
            notify_error("A run is already in progress; wait for it or press Cancel.")
            return None
        self._cancel_event.clear()
        self.last_error = None
        self.progress_bar.setRange(0, 0)  # busy until the first progress report
        self.progress_bar.setFormat("")
        self.cancel_button.setEnabled(True)
        self.set_status(status)
        self._t0 = time.perf_counter()
        worker = create_worker(fn, *args, progress=self.progress, should_cancel=self.should_cancel,
                               _start_thread=False, _ignore_errors=True, **kwargs)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.started.emit()
        worker.start()
        return worker

    def _on_returned(self, result) -> None:
        self.elapsed = time.perf_counter() - self._t0
        if self._cancel_event.is_set() and result is None:
            self._report_cancel()
            return
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.progress_bar.setFormat("done")
        self.set_status(f"Done in {self.elapsed:.1f} s.")
        self.succeeded.emit(result)

    def _report_cancel(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("cancelled")
        self.set_status(f"Cancelled after {self.elapsed:.1f} s; nothing was added.")
        self.cancelled.emit()

    def _on_errored(self, exc) -> None:
        self.elapsed = time.perf_counter() - self._t0
        if isinstance(exc, CancelledError):
            self._report_cancel()
            return
        self.last_error = exc
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("failed")
        self.set_status("Failed: " + error_text(exc))
        notify_error(exc)
        self.failed.emit(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.finished.emit()

    def wait(self, timeout_s: float = 30.0) -> None:
        """Block (processing events) until the run ends; for scripts and tests."""
        from qtpy.QtWidgets import QApplication

        end = time.perf_counter() + timeout_s
        while self.is_running() and time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.005)


class DeviceCombo(QComboBox):
    """Auto / each CUDA GPU / CPU; ``device()`` is the value, ``set_device`` also accepts one that
    is not listed (e.g. ``cuda`` without a GPU) so the run can say why it fails."""

    def __init__(self, tooltip: str = "Where the network runs; Auto uses the first GPU when there is one", parent=None):
        super().__init__(parent)
        compact_combo(self)
        for label, value in device_choices():
            self.addItem(label, value)
        self.setToolTip(tooltip)

    def device(self) -> str:
        return self.currentData() or "auto"

    def set_device(self, value: str) -> None:
        index = self.findData(value)
        if index < 0:
            self.addItem(value, value)
            index = self.count() - 1
        self.setCurrentIndex(index)


def path_field(mode: str = "d", placeholder: str = "", tooltip: str = "", filter: Optional[str] = None):
    """A path line edit with its browse button: magicgui's ``FileEdit`` (``mode`` "d" a folder,
    "r" an existing file, "w" a file to write).  Returns (the widget to lay out, its QLineEdit),
    so callers keep reading and watching a plain ``QLineEdit``."""
    from magicgui.widgets import FileEdit

    field = FileEdit(mode=mode, filter=filter, value="")
    field.choose_btn.text = "..."
    field.choose_btn.tooltip = "Choose a folder" if mode == "d" else "Choose a file"
    edit = field.line_edit.native
    edit.setPlaceholderText(placeholder)
    edit.setToolTip(tooltip)
    field.native.setContentsMargins(0, 0, 0, 0)
    return field.native, edit


def push_button(text: str, tip: str = "", on_click=None) -> QPushButton:
    """A push button with its tooltip and what a click does (the form every widget repeats)."""
    button = QPushButton(text)
    if tip:
        button.setToolTip(tip)
    if on_click is not None:
        button.clicked.connect(on_click)
    return button


def form_layout(rows) -> "QFormLayout":
    """A form of ``(label, widget or layout)`` rows whose fields take the width they are given."""
    from qtpy.QtWidgets import QFormLayout

    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    for label, field in rows:
        form.addRow(label, field)
    return form


class VerticalScrollArea(QScrollArea):
    """Scrolls its page up and down only, and is never narrower than the page's least width (asked
    anew whenever the page's layout changes, so rows added after it was wrapped count)."""

    def __init__(self, page: QWidget):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setWidget(page)
        page.installEventFilter(self)

    def eventFilter(self, watched, event):  # noqa: N802 (Qt name)
        # the page's rows changed: the layouts around the area ask for its hints again (they cache them)
        if watched is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)

    def _width_for(self, page_width: int) -> int:
        """The area's width that leaves ``page_width`` beside a vertical scroll bar (and the frame
        or border a style sheet draws)."""
        border = self.width() - self.maximumViewportSize().width()
        return page_width + self.verticalScrollBar().sizeHint().width() + max(0, border)

    def minimumSizeHint(self):  # noqa: N802 (Qt name)
        return QSize(self._width_for(self.widget().minimumSizeHint().width()), super().minimumSizeHint().height())


def scrolled(widget: QWidget) -> VerticalScrollArea:
    """``widget`` in a vertical scroll area that gives it the dock's width and never clips it."""
    return VerticalScrollArea(widget)


def scrolling_rows(widget: QWidget):
    """The vertical layout for ``widget``'s rows, on a page in a scroll area that fills ``widget``.

    A review step opened on its own (napari's Plugins menu) is a dock as tall as the window: on a
    short screen its rows would be squeezed over each other and its last buttons pushed off the
    window; in a scroll area they keep their height and the dock scrolls."""
    page = QWidget()
    rows = QVBoxLayout(page)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scrolled(page))
    return rows


def short_title(spec) -> str:
    """A network's title without its parenthesised gloss ("MS-UNet"), for narrow rows."""
    return spec.title.split(" (")[0]


def compact_combo(combo, characters: int = 12):
    """Let a drop-down shrink to ``characters`` wide (long entries are elided), so it never
    widens the dock."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(characters)
    return combo


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


__all__: Sequence[str] = (
    "LayerComboBox", "TaskRunner", "notify_error", "notify_warning", "notify_info", "error_text",
    "image_layers", "labels_layers", "layer_geometry", "layer_spacing", "volume_of", "add_labels_like",
    "add_image_like", "label_colormap", "device_choices", "LUNG_COLOR", "INFECTION_COLOR", "MASK_OPACITY",
)
