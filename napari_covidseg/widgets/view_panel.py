"""First section of the workspace: open a CT, set its window, choose the view.

Open buttons go through this plugin's reader (so a CT gets its geometry, lung window and mm
scale, and a DICOM folder its series); the window presets are the :class:`WindowWidget`; the view
buttons and the canvas read-outs are :mod:`reading_aids`.
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .common import notify_error, push_button
from .reading_aids import VIEWS, reading_aids
from .window_widget import WindowWidget

PLUGIN = "napari-covidseg"
FILE_FILTER = ("CT or mask (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.dcm *.zip *.png *.jpg *.jpeg *.tif *.tiff "
               "DICOMDIR);;All files (*)")


class ViewPanel(QWidget):
    """Open (file, folder, sample), window presets, and axial / coronal / sagittal views."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.aids = reading_aids(napari_viewer)

        open_box = QGroupBox("Open")
        row = QHBoxLayout(open_box)
        self.open_file_button = push_button("CT or mask...", "NIfTI, NRRD/MHA, a DICOM file or .zip, 8-bit slices",
                                            self.open_file_dialog)
        self.open_folder_button = push_button("Folder...", "A DICOM series folder, or a folder of numbered 8-bit slices",
                                              self.open_folder_dialog)
        self.sample_button = push_button("Phantom", "The synthetic chest CT phantom with its lung and infection masks",
                                         self.open_sample)
        for button in (self.open_file_button, self.open_folder_button, self.sample_button):
            row.addWidget(button)

        self.window = WindowWidget(napari_viewer)
        window_box = QGroupBox("Window")
        QVBoxLayout(window_box).addWidget(self.window)
        self.window.layout().setContentsMargins(0, 0, 0, 0)

        view_box = QGroupBox("View")
        view_layout = QVBoxLayout(view_box)
        buttons = QHBoxLayout()
        self.view_group = QButtonGroup(self)
        self.view_buttons = {}
        for name in VIEWS:
            button = QPushButton(name.capitalize())
            button.setCheckable(True)
            button.setChecked(name == "axial")
            button.clicked.connect(lambda _checked=False, n=name: self.set_view(n))
            self.view_group.addButton(button)
            self.view_buttons[name] = button
            buttons.addWidget(button)
        view_layout.addLayout(buttons)
        self.aids_check = QCheckBox("Letters, slice position, value under cursor")
        self.aids_check.setToolTip("R/L/A/P (S/I) at the canvas edges, the slice number and its position in mm, "
                                   "and the HU (or 8-bit value) under the mouse")
        self.aids_check.setChecked(self.aids.enabled)
        self.aids_check.toggled.connect(self.aids.set_enabled)
        view_layout.addWidget(self.aids_check)

        layout = QVBoxLayout(self)
        layout.addWidget(open_box)
        layout.addWidget(window_box)
        layout.addWidget(view_box)
        layout.addStretch(1)

    def set_view(self, name: str) -> None:
        if not self.viewer.layers or self.viewer.dims.ndim < 3:
            notify_error("Open a CT volume first: coronal and sagittal views need a 3D image.")
            self.view_buttons["axial"].setChecked(True)
            return
        self.aids.set_view(name)
        self.view_buttons[name].setChecked(True)

    def open_paths(self, paths) -> list:
        """Open ``paths`` with this plugin's reader; errors become notifications."""
        try:
            return self.viewer.open(paths, plugin=PLUGIN)
        except Exception as exc:  # napari wraps reader errors in its own types
            notify_error(exc)
            return []

    def open_file_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open a chest CT or mask", "", FILE_FILTER)
        if path:
            self.open_paths(path)

    def open_folder_dialog(self):
        path = QFileDialog.getExistingDirectory(self, "Open a DICOM series or a folder of slices")
        if path:
            self.open_paths(path)

    def open_sample(self):
        self.viewer.open_sample(PLUGIN, "chest_phantom")
