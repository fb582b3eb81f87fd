"""The model card of the chosen weights: a few lines always shown, the rest behind "Details".

The compact part says what the network was trained on, a warning where its results must not be
trusted on patient CT (phantom-only weights), what images it reads and its best held-out
figures per class; "Details" opens the split, epochs, training time and device, the deviations
from the paper and every stored metric (:func:`napari_covidseg.weights_catalog.model_card`).
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QLabel, QToolButton, QVBoxLayout

from ..weights_catalog import model_card

WARNING_STYLE = "background: #6b4a00; color: #ffe0a0; border-radius: 3px; padding: 2px 4px;"


def _label(style: str = "") -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    if style:
        label.setStyleSheet(style)
    return label


class ModelCardView(QFrame):
    """Shows :func:`model_card` of a weights entry (or why there is none)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QFrame.StyledPanel)
        self.headline = _label("font-weight: bold;")
        self.warning = _label(WARNING_STYLE)
        self.summary = _label()
        self.details_button = QToolButton()
        self.details_button.setText("Details")
        self.details_button.setCheckable(True)
        self.details_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.details_button.setArrowType(Qt.RightArrow)
        self.details_button.setAutoRaise(True)
        self.details_button.toggled.connect(self.show_details)
        self.details = _label("color: gray;")
        self.details.setVisible(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.setSpacing(2)
        for widget in (self.headline, self.warning, self.summary, self.details_button, self.details):
            layout.addWidget(widget)
        self.card = None

    def show_entry(self, entry) -> None:
        if entry is None:
            self.card = None
            self.headline.setText("No weights for this network")
            self.warning.setVisible(False)
            self.summary.setText("Train it (Train section) or use Browse... to choose a checkpoint.")
            self.details_button.setVisible(False)
            self.details.setVisible(False)
            return
        self.card = card = model_card(entry.info, shipped=entry.shipped)
        self.headline.setText(card.headline)
        self.warning.setText("\u26a0 " + card.warning if card.warning else "")
        self.warning.setVisible(bool(card.warning))
        self.summary.setText("\n".join([card.reads] + card.figures))
        self.details.setText("\n".join(card.details))
        self.details_button.setVisible(True)
        self.details.setVisible(self.details_button.isChecked())
        self.setToolTip(card.text())

    def show_details(self, shown: bool) -> None:
        self.details_button.setArrowType(Qt.DownArrow if shown else Qt.RightArrow)
        self.details.setVisible(bool(shown) and self.card is not None)
