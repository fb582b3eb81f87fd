"""The "COVID-19 CT" workspace: every step of a review in one dock, in the order it is done.

Seven docks stacked vertically need a window over 3000 px tall; this dock holds them as sections
of a tool box (one open at a time, every title always visible), each in a scroll area, so the
whole flow fits a 1366x768 screen and nothing is ever off screen.  The sections are the same
widgets napari lists one by one under Plugins, so a user who prefers separate docks loses nothing.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import QSizePolicy, QToolBox, QVBoxLayout, QWidget

from .common import scrolled

#: preferred dock width (px) on a 1920 px screen, and the least it may be on a 1366 px one
DOCK_WIDTH = 460
MIN_DOCK_WIDTH = 380


def _sections() -> List[Tuple[str, str, Callable, bool]]:
    """(key, title, factory, scrolled) in flow order; imported late so a broken section says which."""
    from .compare_widget import CompareWidget
    from .quantify_widget import QuantifyWidget
    from .save_widget import SaveWidget
    from .segment_widget import SegmentWidget
    from .side_by_side_widget import SideBySideWidget
    from .training_widget import TrainingWidget
    from .view_panel import ViewPanel

    return [
        ("view", "1  Open and view", ViewPanel, True),
        # the steps that are also docks of their own scroll their rows themselves (common.scrolling_rows)
        ("segment", "2  Segment", SegmentWidget, False),
        ("compare", "3  Compare to ground truth", CompareWidget, False),
        ("save", "4  Correct and save", SaveWidget, False),
        ("quantify", "5  Quantify and report", QuantifyWidget, False),
        ("side_by_side", "6  Side by side (several networks)", SideBySideWidget, False),
        ("train", "7  Train or fine-tune", TrainingWidget, False),  # has its own tabs and scroll area
    ]


def section_style(theme_name: str) -> str:
    """Section titles drawn as napari draws its own buttons (the default tool box tab shape is
    illegible on napari's dark theme)."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(theme_name)
        normal, hover, current, text = (str(c.as_hex()) for c in (theme.foreground, theme.highlight, theme.current,
                                                                    theme.text))
    except Exception:  # an unknown theme: Qt's palette
        normal, hover, current, text = "palette(button)", "palette(midlight)", "palette(highlight)", "palette(text)"
    return (f"QToolBox::tab {{ background: {normal}; color: {text}; border-radius: 3px; padding: 3px 6px; "
            f"font-weight: bold; }} QToolBox::tab:hover {{ background: {hover}; }} "
            f"QToolBox::tab:selected {{ background: {current}; }}")


class _OwnScrolling(QWidget):
    """Holds a section that scrolls by itself (the steps' rows are on a scroll area's page; Train's
    setup page is a scroll area).

    QToolBox puts each page in a scroll area that scrolls as soon as the page's preferred height
    (through a layout, its height for the width) is more than the room, which for Train is the
    whole form.  Without a layout and asking for no more than its least height, the section gets
    the room it is given and keeps a single scroll bar, its own."""

    def __init__(self, widget: QWidget):
        super().__init__()
        widget.setParent(self)
        self.inner = widget

    def sizeHint(self):  # noqa: N802 (Qt name)
        return QSize(self.inner.sizeHint().width(), self.inner.minimumSizeHint().height())

    def minimumSizeHint(self):  # noqa: N802 (Qt name)
        return self.inner.minimumSizeHint()

    def resizeEvent(self, event):  # noqa: N802 (Qt name)
        self.inner.setGeometry(0, 0, self.width(), self.height())
        super().resizeEvent(event)


class WorkspaceWidget(QWidget):
    """All review steps as sections of one dock; ``section(key)`` gives a step's widget."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.toolbox = QToolBox()
        self.sections: Dict[str, QWidget] = {}
        self._keys: List[str] = []
        for key, title, factory, scroll in _sections():
            widget = factory(napari_viewer)
            self.sections[key] = widget
            self._keys.append(key)
            self.toolbox.addItem(scrolled(widget) if scroll else _OwnScrolling(widget), title)
        self.toolbox.setStyleSheet(section_style(getattr(napari_viewer, "theme", "dark")))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.toolbox)
        for widget in self.sections.values():  # a section's least width changes once styled (or rows change)
            widget.installEventFilter(self)
        # napari adds a stretch under docks that do not ask for height: this one takes it all
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)

    def least_width(self) -> int:
        """The narrowest the dock may be: every section at its least width, with no sideways scrolling
        (and never under ``MIN_DOCK_WIDTH``)."""
        margins = self.layout().contentsMargins()
        chrome = margins.left() + margins.right() + 2 * self.toolbox.frameWidth()
        widest = 0
        for index in range(self.toolbox.count()):
            page = self.toolbox.widget(index)
            area = page.parentWidget().parentWidget()  # QToolBox's own scroll area (page -> viewport -> area)
            widest = max(widest, page.minimumSizeHint().width() + 2 * area.frameWidth())
        return max(MIN_DOCK_WIDTH, widest + chrome)

    def minimumSizeHint(self):  # noqa: N802 (Qt name)
        return QSize(self.least_width(), super().minimumSizeHint().height())

    def eventFilter(self, watched, event):  # noqa: N802 (Qt name)
        # the toolbox's scroll areas do not pass their pages' hints on: the dock asks this one again
        if event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)

    def section(self, key: str) -> QWidget:
        return self.sections[key]

    def show_section(self, key: str) -> QWidget:
        """Open the section ``key`` (and close the one that was open)."""
        self.toolbox.setCurrentIndex(self._keys.index(key))
        return self.sections[key]

    def current_key(self) -> str:
        return self._keys[self.toolbox.currentIndex()]


def dock_width_for(screen_width: int) -> int:
    """The workspace dock's width on a screen ``screen_width`` px wide (a quarter, within bounds)."""
    return int(max(MIN_DOCK_WIDTH, min(DOCK_WIDTH, screen_width // 4)))


def lay_out(viewer, dock) -> None:
    """Fill the screen with the window and give the workspace dock its width (``covidseg view``)."""
    from qtpy.QtWidgets import QApplication

    window = viewer.window._qt_window
    screen = QApplication.primaryScreen()
    available = screen.availableGeometry() if screen is not None else None
    if available is not None:
        window.resize(available.width(), available.height())
        window.move(available.x(), available.y())
    width = dock_width_for(available.width() if available is not None else 1920)
    window.resizeDocks([dock], [width], Qt.Horizontal)
