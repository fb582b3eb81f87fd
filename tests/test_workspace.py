"""The "COVID-19 CT" workspace dock: every step in one dock that fits 1920x1080 and 1366x768."""

import os

import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QScrollArea

from napari_covidseg import cli
from napari_covidseg.widgets.compare_widget import CompareWidget
from napari_covidseg.widgets.quantify_widget import QuantifyWidget
from napari_covidseg.widgets.save_widget import SaveWidget
from napari_covidseg.widgets.segment_widget import SegmentWidget
from napari_covidseg.widgets.side_by_side_widget import SideBySideWidget
from napari_covidseg.widgets.training_widget import TrainingWidget
from napari_covidseg.widgets.view_panel import ViewPanel
from napari_covidseg.widgets.workspace import MIN_DOCK_WIDTH, WorkspaceWidget, dock_width_for

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")
FLOW = [("view", ViewPanel), ("segment", SegmentWidget), ("compare", CompareWidget), ("save", SaveWidget),
        ("quantify", QuantifyWidget), ("side_by_side", SideBySideWidget), ("train", TrainingWidget)]


def _docked(make_napari_viewer, size):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    viewer.open_sample("napari-covidseg", "chest_phantom_small")
    dock, workspace = viewer.window.add_plugin_dock_widget("napari-covidseg", "COVID-19 CT")
    window.resizeDocks([dock], [dock_width_for(size[0])], 1)
    return viewer, dock, workspace


@pytest.mark.parametrize("size", [(1920, 1080), (1366, 768)])
def test_every_step_fits_the_screen(make_napari_viewer, qtbot, size):
    viewer, dock, workspace = _docked(make_napari_viewer, size)
    assert isinstance(workspace, WorkspaceWidget)
    assert [key for key, _ in FLOW] == workspace._keys
    window = viewer.window._qt_window
    os.makedirs(SCREENSHOTS, exist_ok=True)
    for key, kind in FLOW:
        section = workspace.show_section(key)
        qtbot.wait(30)
        assert isinstance(section, kind) and workspace.current_key() == key
        # the dock (all titles + the open section) is inside the window, and the window on screen
        assert window.height() <= size[1] and window.width() <= size[0]
        assert dock.geometry().bottom() <= window.height() and dock.height() >= 0.6 * window.height()
        area = workspace.toolbox.currentWidget()
        room = area.viewport().width() if isinstance(area, QScrollArea) else area.width()
        assert room >= section.minimumSizeHint().width(), key  # nothing is cut off on the right
        if not isinstance(area, QScrollArea):  # a section with its own scroll area is not scrolled again
            page = area.parent().parent()  # QToolBox's own scroll area around the page
            assert not page.verticalScrollBar().isVisible(), key
            assert not page.horizontalScrollBar().isVisible(), key
            assert page.viewport().width() >= section.minimumSizeHint().width(), key
        assert dock.width() <= max(MIN_DOCK_WIDTH + 60, dock_width_for(size[0]) + 20), key
        window.grab().save(os.path.join(SCREENSHOTS, f"workspace_{key}_{size[0]}x{size[1]}.png"))


def test_view_opens_the_workspace_laid_out_without_the_qt5_toast(make_napari_viewer, monkeypatch, qtbot):
    import napari
    from napari._qt import qt_main_window
    from napari.utils.notifications import notification_manager

    # covidseg view's own code path, on a viewer the napari fixture cleans up
    monkeypatch.setattr(napari, "Viewer", lambda **kwargs: make_napari_viewer(**kwargs))
    monkeypatch.setattr(qt_main_window, "SHOW_QT_WARNING", True)  # as on a user's first launch
    shown = []
    monkeypatch.setattr(notification_manager, "dispatch", lambda n: shown.append(str(n.message)))
    viewer = cli.open_viewer([], sample="small")
    viewer.window._qt_window.show()
    qtbot.wait(50)
    assert any("COVID-19 CT" in name for name in viewer.window.dock_widgets)
    assert not any("PyQt5" in message for message in shown)
    assert qt_main_window.SHOW_QT_WARNING is False
    workspace = viewer.window._qt_window.findChild(WorkspaceWidget)
    assert workspace is not None and workspace.width() >= MIN_DOCK_WIDTH


STANDALONE = [("Segment", SegmentWidget), ("Compare to ground truth", CompareWidget), ("Correct and save", SaveWidget),
              ("Quantify", QuantifyWidget), ("Side by side", SideBySideWidget)]


@pytest.mark.parametrize("title,kind", STANDALONE)
def test_a_step_opened_as_its_own_dock_scrolls_instead_of_squeezing(make_napari_viewer, qtbot, title, kind):
    """Plugins menu -> one step on a 1366 x 768 screen: the window stays on the screen, the step's
    rows keep their full height (scrolling when the dock is shorter) and its full width."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1366, 768)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-covidseg", title)
    assert isinstance(widget, kind)
    area = widget.findChild(QScrollArea)
    page = area.widget()
    qtbot.wait(100)
    window.resizeDocks([dock], [150], Qt.Horizontal)  # a user drags the dock narrow: it stops at the page's width
    # nothing cut off on the right, once the dock is laid out again (a few event-loop turns)
    qtbot.waitUntil(lambda: area.viewport().width() >= page.minimumSizeHint().width(), timeout=3000)
    assert window.height() <= 768 and window.width() <= 1366
    assert page.height() >= page.layout().totalHeightForWidth(page.width()) - 1, title  # rows not squeezed
