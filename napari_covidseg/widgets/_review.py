"""Small Qt helpers shared by the review widgets (Compare, Correct and save, Quantify).

Slice navigation goes through the layer's scale and translate, so "slice z" means the same
voxel plane whatever the layer's spacing; file-overwrite questions go through one function so
tests can answer them without a modal dialog.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QMessageBox


def _axis(viewer, layer) -> int:
    """The viewer dimension that walks the layer's first (z) axis."""
    return viewer.dims.ndim - layer.ndim


def current_slice(viewer, layer) -> int:
    """Index, in ``layer.data``, of the axial slice the viewer shows."""
    axis = _axis(viewer, layer)
    world = float(viewer.dims.point[axis])
    z = (world - float(layer.translate[0])) / float(layer.scale[0])
    return int(np.clip(round(z), 0, layer.data.shape[0] - 1))


def go_to_slice(viewer, layer, z: int) -> None:
    """Show the layer's slice ``z`` (a data index)."""
    axis = _axis(viewer, layer)
    viewer.dims.set_point(axis, float(layer.translate[0]) + int(z) * float(layer.scale[0]))


def ask_overwrite(parent, path) -> bool:
    """Ask whether ``path`` may be replaced; False unless the user says Yes."""
    answer = QMessageBox.question(
        parent,
        "Replace file?",
        f"{path} already exists.\nReplace it?",
        QMessageBox.Yes | QMessageBox.No,
        QMessageBox.No,
    )
    return answer == QMessageBox.Yes


def free_path(path) -> Path:
    """``path`` if no file is there, else the first free ``<stem>_2<suffix>``, ``_3``, ..."""
    path = Path(path)
    if not path.exists():
        return path
    name = path.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    k = 2
    while (path.parent / f"{stem}_{k}{suffix}").exists():
        k += 1
    return path.parent / f"{stem}_{k}{suffix}"


class LayerCombo(QComboBox):
    """A drop-down of the viewer's layers of one kind, kept current as layers come and go.

    ``list_layers(viewer)`` gives the candidates (e.g. ``labels_layers``).  The selection is kept
    by layer identity across refreshes, so renaming or adding a layer does not switch what the
    user picked; ``prefer`` (a callable on a layer, giving a bool or a score) chooses the initial
    pick: the candidate with the highest score, the first of equals; an automatic pick gives way
    to a better-scored layer that arrives later.  :meth:`repick` applies it again (the scores may
    have changed, e.g. a mask was edited) unless the user chose by hand.
    """

    def __init__(self, viewer, list_layers, allow_none: bool = False, prefer=None, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self._list_layers = list_layers
        self._allow_none = allow_none
        self._prefer = prefer
        self._layers = []
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self.refresh)
        self.user_picked = False
        self.activated.connect(self._activated)
        self.refresh()

    def refresh(self, event=None):
        previous = self.current_layer()
        layers = list(self._list_layers(self.viewer))
        for layer in layers:
            try:
                layer.events.name.disconnect(self.refresh)
            except (TypeError, ValueError, RuntimeError):
                pass
            layer.events.name.connect(self.refresh)
        self.blockSignals(True)
        self.clear()
        self._layers = ([None] if self._allow_none else []) + layers
        for layer in self._layers:
            self.addItem("(none)" if layer is None else layer.name)
        keep = previous is not None and previous in self._layers
        if keep and (self.user_picked or not self._outscored(previous, layers)):
            index = self._layers.index(previous)
        elif previous is None and self._allow_none and self._picked_none:
            index = 0
        else:
            index = self._best_index(layers)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.current_layer() is not previous:
            self.currentIndexChanged.emit(self.currentIndex())

    def _activated(self, index) -> None:
        self._user_none = self.current_layer() is None
        self.user_picked = True

    def _outscored(self, layer, layers) -> bool:
        """True when an automatic pick ``layer`` is no longer the best (e.g. the ground truth was the
        only mask when the list was made, and a network's mask has arrived since)."""
        if self._prefer is None:
            return False
        return max(self._prefer(other) for other in layers) > self._prefer(layer)

    def _best_index(self, layers) -> int:
        scores = [self._prefer(layer) if self._prefer is not None else 0 for layer in layers]
        if scores and max(scores):
            return self._layers.index(layers[scores.index(max(scores))])
        return 0 if self._layers else -1

    def repick(self) -> None:
        """Choose the best-scored layer again, unless the user picked one by hand."""
        if not self.user_picked:
            layers = [layer for layer in self._layers if layer is not None]
            self.setCurrentIndex(self._best_index(layers))

    @property
    def _picked_none(self) -> bool:
        """True once the user chose "(none)" on purpose (kept across refreshes)."""
        return getattr(self, "_user_none", False)

    def current_layer(self):
        index = self.currentIndex()
        if 0 <= index < len(self._layers):
            return self._layers[index]
        return None

    def set_layer(self, layer) -> None:
        """Choose ``layer`` as a user would (kept by :meth:`repick`)."""
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))
        self._user_none = layer is None
        self.user_picked = True


#: Labels layer events that mean "the mask changed": a brush/fill stroke, napari's own
#: labels_update, and the whole array being replaced
LABEL_EDIT_EVENTS = ("paint", "labels_update", "data")


class EditWatcher:
    """Turns a burst of edits of some Labels layers into one call of ``on_settled``.

    ``on_settled`` runs ``delay_ms`` after the last edit (so painting stays fluid); ``enabled``
    is asked at each edit (e.g. an "update automatically" checkbox).
    """

    def __init__(self, parent, on_settled, delay_ms: int, enabled=lambda: True):
        self.timer = QTimer(parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(delay_ms)
        self.timer.timeout.connect(on_settled)
        self._enabled = enabled
        self.layers = []

    def watch(self, layers) -> None:
        """Listen to ``layers`` (and stop listening to the ones watched before)."""
        self._connect(self.layers, False)
        self.layers = [layer for layer in layers if layer is not None]
        self._connect(self.layers, True)

    def _connect(self, layers, connect: bool) -> None:
        for layer in layers:
            for name in LABEL_EDIT_EVENTS:
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    (emitter.connect if connect else emitter.disconnect)(self.edited)

    def edited(self, event=None) -> None:
        if self._enabled():
            self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def pending(self) -> bool:
        return self.timer.isActive()
