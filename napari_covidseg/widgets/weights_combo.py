"""A drop-down of the weights available for one network, with a "Browse..." button.

Lists the shipped weights first and then the user's checkpoints from
:mod:`napari_covidseg.weights_catalog`; it follows the catalog, so a checkpoint that the Training
widget just finished appears here without reopening the widget.  The tooltip of each entry says
what the weights were trained on and how well they did on validation data.
"""

from __future__ import annotations

from typing import Optional

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QWidget

from .. import weights_catalog
from ..errors import CovidsegError
from .common import notify_error, push_button

NO_WEIGHTS = "(no weights: train one or Browse...)"
NO_WEIGHTS_SHORT = "(no weights yet)"


class WeightsCombo(QWidget):
    """Pick the weights of ``network``.

    ``changed`` fires when the pick changes; ``other_network(entry)`` fires when the user browsed
    to a checkpoint of another network (the Segment widget then switches network).
    """

    changed = Signal()
    other_network = Signal(object)

    def __init__(self, network: Optional[str] = None, parent=None, browse: bool = True):
        super().__init__(parent)
        self.network = network
        self._entries = []
        self._empty_text = NO_WEIGHTS if browse else NO_WEIGHTS_SHORT
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(8)
        self.combo.currentIndexChanged.connect(self._index_changed)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        self.browse_button = None
        if browse:
            self.browse_button = push_button("Browse...", "Use a checkpoint file (.pt) saved by napari-covidseg training",
                                             self.browse)
            layout.addWidget(self.browse_button)
        self._disconnect = weights_catalog.on_change(self.refresh)
        self.destroyed.connect(lambda *_: self._disconnect())
        self.refresh()

    # --- contents ------------------------------------------------------------------------------
    def set_network(self, network: Optional[str]) -> None:
        if network != self.network:
            self.network = network
            self.refresh(keep=False)

    def refresh(self, keep: bool = True) -> None:
        previous = self.current_path() if keep else None
        previous_description = self.current_entry().description if keep and self.current_entry() else None
        try:
            self._entries = weights_catalog.entries(self.network) if self.network else []
        except CovidsegError as exc:  # pragma: no cover - entries() swallows unreadable files
            notify_error(exc)
            self._entries = []
        self.combo.blockSignals(True)
        self.combo.clear()
        for i, entry in enumerate(self._entries):
            self.combo.addItem(entry.label, entry.path)
            self.combo.setItemData(i, entry.description, _tooltip_role())
        if not self._entries:
            self.combo.addItem(self._empty_text, None)
        paths = [e.path for e in self._entries]
        self.combo.setCurrentIndex(paths.index(previous) if previous in paths else 0)
        self.combo.blockSignals(False)
        self._update_tooltip()
        entry = self.current_entry()
        # the same path with new contents (best.pt after a resumed run) is a change too
        if self.current_path() != previous or (entry is not None and entry.description != previous_description):
            self.changed.emit()

    def _index_changed(self, *_):
        self._update_tooltip()
        self.changed.emit()

    def _update_tooltip(self):
        entry = self.current_entry()
        self.combo.setToolTip(entry.description if entry else "No weights for this network yet.")

    # --- selection -----------------------------------------------------------------------------
    def current_entry(self):
        index = self.combo.currentIndex()
        if 0 <= index < len(self._entries):
            return self._entries[index]
        return None

    def current_path(self) -> Optional[str]:
        entry = self.current_entry()
        return entry.path if entry else None

    def select_path(self, path) -> bool:
        import os

        key = os.path.abspath(os.fspath(path))
        for i, entry in enumerate(self._entries):
            if os.path.abspath(entry.path) == key:
                self.combo.setCurrentIndex(i)
                return True
        return False

    # --- browsing ------------------------------------------------------------------------------
    def browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.use_file(path)

    def use_file(self, path) -> Optional[object]:
        """Register ``path`` in the catalog and select it (errors become notifications)."""
        try:
            entry = weights_catalog.add_checkpoint(path)
        except CovidsegError as exc:
            notify_error(exc)
            return None
        if self.network is not None and entry.network != self.network:
            self.other_network.emit(entry)
        else:
            self.select_path(entry.path)
        return entry


def _tooltip_role():
    from qtpy.QtCore import Qt

    return Qt.ToolTipRole
