"""Correct-and-save dock widget: keep a hand-corrected mask, as a file or as training data.

After fixing a prediction with napari's brush and eraser, the user saves it with the geometry of
the CT it belongs to, in the CT's own format where it holds labels (NIfTI, NRRD, MHA; NIfTI for
DICOM and slices).  The defaults are the edited mask, ``<case>_<class>_corrected`` and a folder
outside any training folder (:mod:`save_defaults`); with nothing to save, no dialog opens.  It
keeps the mask with the geometry of the CT it belongs to (affine and header from the CT layer's ``metadata[GEOMETRY_KEY]``), so the
mask lines up with the CT in any other viewer.  The widget never writes over the source CT, asks
before replacing any other file and otherwise suggests a free name.  "Add to training folder"
turns the corrected case into training data in the ``pairs`` layout (see
:mod:`napari_covidseg.training_folder`), never clobbering an existing case.  "Revert edits" puts
back the mask as it was when it appeared in the viewer (a copy is kept for every Labels layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from ..errors import CovidsegError, DataFolderError, InputError
from ..io.geometry import GEOMETRY_KEY, Geometry
from ..training_folder import add_case, case_exists, list_cases, suggest_case_id, validate_case_id
from ._review import LayerCombo, ask_overwrite, free_path
from .common import (
    TaskRunner,
    error_text,
    form_layout,
    image_layers,
    labels_layers,
    notify_error,
    path_field,
    push_button,
    scrolling_rows,
)
from .edits import mark_computed, watch_edits
from .save_defaults import case_of, class_mask_score, default_folder, default_name, mask_score


def _same_file(a, b) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def source_paths(layer) -> list:
    """Files a layer was read from (its geometry's source and napari's ``layer.source.path``)."""
    paths = []
    geometry = layer.metadata.get(GEOMETRY_KEY) if layer is not None else None
    if isinstance(geometry, Geometry) and geometry.source_path:
        paths.append(geometry.source_path)
    source = getattr(getattr(layer, "source", None), "path", None)
    if source:
        paths.append(str(source))
    return paths


def ct_geometry(ct_layer, mask_shape) -> Geometry:
    """The CT's geometry for saving a mask of ``mask_shape``; clear error if it cannot be used."""
    geometry = ct_layer.metadata.get(GEOMETRY_KEY)
    if not isinstance(geometry, Geometry):
        raise InputError(
            f"'{ct_layer.name}' has no NIfTI geometry (it was not opened with the covidseg reader): "
            "open the CT with File > Open and 'napari-covidseg', or use the phantom sample."
        )
    if tuple(ct_layer.data.shape[-3:]) != tuple(mask_shape):
        raise InputError(
            f"The mask has shape {tuple(mask_shape)} but the CT '{ct_layer.name}' has shape "
            f"{tuple(ct_layer.data.shape[-3:])}: pick the CT this mask was made from."
        )
    return geometry


def _compact(array: np.ndarray) -> np.ndarray:
    """A copy in the smallest unsigned type that holds it (masks are small integers)."""
    array = np.asarray(array)
    if array.size and array.min() >= 0:
        top = int(array.max())
        for dtype in (np.uint8, np.uint16):
            if top <= np.iinfo(dtype).max:
                return array.astype(dtype)
    return array.copy()


def mask_suffix_for(ct_layer) -> str:
    """The suffix a mask of ``ct_layer`` is saved with: the CT's format where it holds labels."""
    from ..io.loader import mask_suffix

    paths = source_paths(ct_layer) if ct_layer is not None else []
    return mask_suffix(paths[0] if paths else "")


def _with_mask_suffix(path, default: str = ".nii.gz") -> Path:
    from ..io.loader import WRITABLE_SUFFIXES

    path = Path(path)
    return path if path.name.lower().endswith(WRITABLE_SUFFIXES) else path.with_name(path.name + default)


def run_save(path, array, geometry, overwrite, progress=None, should_cancel=None) -> Path:
    """save_any() for a :class:`TaskRunner` (one atomic write: nothing to cancel half way)."""
    from ..io.loader import save_any

    return save_any(path, array, geometry, overwrite=overwrite)


class SaveWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._originals: Dict[int, np.ndarray] = {}  # id(layer) -> mask before brush edits
        self._reverting = False
        self.mask_combo = LayerCombo(napari_viewer, labels_layers, prefer=mask_score)
        self.ct_combo = LayerCombo(napari_viewer, image_layers)
        self.save_button = push_button("Save mask...",
                                       "Write the mask with the CT's affine and header, in the CT's format where it "
                                       "holds labels (NIfTI, NRRD, MHA), else NIfTI",
                                       self.save_dialog)
        self.revert_button = push_button("Revert edits", "Put back the mask as it was when it appeared in the viewer",
                                         self.revert)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.revert_button)
        self.runner = TaskRunner(self, unit="files")
        self.runner.setVisible(False)  # shown only while files are written
        self.runner.started.connect(lambda: self.runner.setVisible(True))
        self.runner.succeeded.connect(self._succeeded)
        self.runner.failed.connect(self._failed)
        self.runner.cancelled.connect(lambda: self.status.setText("Cancelled; nothing was kept."))
        self.runner.finished.connect(self._finished)
        self._on_success = self._on_failure = None
        self.status = QLabel("Edit a mask with the brush, then save it with its CT's geometry.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)  # the saved path can be copied
        layout = scrolling_rows(self)
        layout.addLayout(form_layout([("Mask", self.mask_combo), ("CT", self.ct_combo)]))
        layout.addLayout(buttons)
        layout.addWidget(self._training_box())
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.ct_combo.currentIndexChanged.connect(self._default_case_id)
        napari_viewer.layers.events.inserted.connect(self._on_inserted)
        napari_viewer.layers.events.removed.connect(self._on_removed)
        for layer in labels_layers(napari_viewer):
            self._remember(layer)
        self._default_case_id()

    def _training_box(self) -> QGroupBox:
        folder_field, self.folder_edit = path_field("d", "training data folder")
        self.folder_edit.textChanged.connect(self._folder_changed)
        self.case_edit = QLineEdit()
        self.case_edit.setPlaceholderText("case id (default: CT name)")
        self.lung_combo = LayerCombo(self.viewer, labels_layers, allow_none=True, prefer=class_mask_score("lung"))
        self.infection_combo = LayerCombo(self.viewer, labels_layers, allow_none=True,
                                          prefer=class_mask_score("infection"))
        self.add_button = push_button("Add to training folder", "Write images/<case>, lung/<case>, infection/<case> (.nii.gz)",
                                      self.add_to_training_folder)
        box = QGroupBox("Add to training folder")
        column = QVBoxLayout(box)
        column.addLayout(form_layout([("Folder", folder_field), ("Case id", self.case_edit),
                                      ("Lung mask", self.lung_combo), ("Infection mask", self.infection_combo)]))
        column.addWidget(self.add_button)
        return box

    def _folder_changed(self, text: str) -> None:
        """The full path as tooltip (the field may cut it) and how many cases the folder holds."""
        self.folder_edit.setToolTip(text)
        if text and Path(text).is_dir():
            n = len(list_cases(text))
            self.status.setText(f"{text} holds {n} case{'s' if n != 1 else ''}.")

    # --- original copies for "Revert edits" ---------------------------------------------------
    # A copy of every Labels layer is taken when it appears and again whenever its whole array
    # is replaced (``layer.data = ...``: a network re-run, a file re-read), never on brush edits
    # (those change the array in place), so "Revert" goes back to the last computed mask.
    def _remember(self, layer):
        if layer in labels_layers(self.viewer) and id(layer) not in self._originals:
            self._originals[id(layer)] = _compact(layer.data)
            layer.events.data.connect(self._on_data_replaced)
            if "covidseg_computed_checksum" not in layer.metadata:
                watch_edits(layer)  # masks from files can be corrected too

    def _on_data_replaced(self, event):
        layer = getattr(event, "source", None)
        if layer is not None and id(layer) in self._originals and not self._reverting:
            self._originals[id(layer)] = _compact(layer.data)

    def _on_inserted(self, event):
        self._remember(event.value)

    def _on_removed(self, event):
        if self._originals.pop(id(event.value), None) is not None:
            event.value.events.data.disconnect(self._on_data_replaced)

    def revert(self):
        layer = self.mask_combo.current_layer()
        if layer is None:
            return
        original = self._originals.get(id(layer))
        if original is None or original.shape != layer.data.shape:
            notify_error(f"No original copy of '{layer.name}' is kept, so its edits cannot be reverted.")
            return
        self._reverting = True
        try:
            layer.data = original.astype(layer.data.dtype)
        finally:
            self._reverting = False
        mark_computed(layer)
        self.status.setText(f"'{layer.name}' is back to how it was when it appeared.")

    # --- save -------------------------------------------------------------------------------
    def _default_case_id(self, *_):
        ct = self.ct_combo.current_layer()
        if ct is not None and not self.case_edit.isModified():
            self.case_edit.setText(case_of(ct))

    def _start_folder(self) -> Path:
        ct = self.ct_combo.current_layer()
        for path in source_paths(ct):
            if Path(path).parent.is_dir():
                return default_folder(path)
        return Path.cwd()

    def _prepare_save(self, path):
        """(path, mask array, CT geometry) for saving, or a clear error; checks only, no I/O."""
        mask, ct = self.mask_combo.current_layer(), self.ct_combo.current_layer()
        if mask is None or ct is None:
            raise InputError("Choose the mask (Labels layer) to save and the CT it belongs to.")
        path = _with_mask_suffix(path, mask_suffix_for(ct))
        for source in source_paths(ct):
            if _same_file(path, source):
                raise InputError(
                    f"{path} is the CT '{ct.name}' itself; it is never overwritten. Choose another file name."
                )
        geometry = ct_geometry(ct, mask.data.shape)
        return path, np.asarray(mask.data), geometry

    def save_mask(self, path, overwrite: bool = False) -> Path:
        """Save the chosen mask to ``path`` with the chosen CT's geometry, in this thread.

        Never writes over the file the CT was read from, even with ``overwrite``.
        """
        path, array, geometry = self._prepare_save(path)
        return run_save(path, array, geometry, overwrite)

    def busy(self) -> bool:
        return self.runner.is_running()

    def suggested_path(self) -> Path:
        """Where the dialog opens: ``<case>_<class>_corrected`` next to the CT, outside a training folder.

        Raises :class:`InputError` (before any dialog) when nothing can be saved."""
        self.mask_combo.repick()  # the mask edited since the list was made, unless the user chose
        mask, ct = self.mask_combo.current_layer(), self.ct_combo.current_layer()
        if mask is None:
            raise InputError("There is no mask to save: run Segment, or open a mask (File > Open).")
        if ct is None:
            raise InputError("Open the CT this mask belongs to: the mask is saved with the CT's geometry.")
        ct_geometry(ct, mask.data.shape)
        return free_path(self._start_folder() / default_name(ct, mask, mask_suffix_for(ct)))

    def save_dialog(self):
        try:
            suggested = self.suggested_path()
        except CovidsegError as error:
            notify_error(error)
            self.status.setText(str(error))
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save mask", str(suggested), "Masks (*.nii.gz *.nii *.nrrd *.mha)", options=QFileDialog.DontConfirmOverwrite
        )
        if path:
            self.save_to(path)

    def save_to(self, path):
        """Save in a worker, asking before replacing an existing file (the dialog's path lands here).

        Returns the worker, or None when nothing is started (declined, or a clear error shown).
        """
        try:
            path, array, geometry = self._prepare_save(path)
        except CovidsegError as error:
            notify_error(error)
            self.status.setText(str(error))
            return None
        overwrite = False
        if path.exists():
            if not ask_overwrite(self, path):
                self.status.setText(f"Not saved: {path} exists. A free name would be {free_path(path).name}.")
                return None
            overwrite = True
        name = self.mask_combo.current_layer().name
        # A copy: the user may go on painting while the file is compressed and written.
        self._on_success = lambda written: self.status.setText(f"Saved '{name}' to {written}")
        return self.runner.start(run_save, path, np.array(array, copy=True), geometry, overwrite, status=f"Saving {path.name}...")

    # --- training folder --------------------------------------------------------------------
    def add_to_training_folder(self):
        """Write the CT and the chosen masks as a new case in a worker; never replaces a case.

        Unless chosen by hand, the masks are the corrected ones of each class (edited first)."""
        self.lung_combo.repick()
        self.infection_combo.repick()
        ct = self.ct_combo.current_layer()
        lung, infection = self.lung_combo.current_layer(), self.infection_combo.current_layer()
        folder = self.folder_edit.text().strip()
        case_id = self.case_edit.text().strip() or (case_of(ct) if ct is not None else "")
        try:
            if ct is None:
                raise InputError("Choose the CT (Image layer) of the case.")
            if not folder:
                raise InputError("Choose a training data folder first (Browse...).")
            if lung is None and infection is None:
                raise InputError("Choose a lung mask, an infection mask or both: a training case needs at least one mask.")
            case_id = validate_case_id(case_id)
            geometry = ct_geometry(ct, ct.data.shape[-3:])
            for layer in (lung, infection):
                if layer is not None and layer.data.shape != ct.data.shape:
                    raise InputError(
                        f"'{layer.name}' has shape {layer.data.shape} but the CT '{ct.name}' has shape "
                        f"{ct.data.shape}: pick masks made from this CT."
                    )
            if case_exists(folder, case_id):
                raise DataFolderError(
                    f"Case '{case_id}' already exists in {folder}; nothing was written. "
                    f"Use another case id, e.g. '{suggest_case_id(folder, case_id)}'."
                )
        except DataFolderError as error:
            self._case_refused(error, folder, case_id)
            return None
        except (CovidsegError, OSError) as error:
            notify_error(error)
            self.status.setText(str(error))
            return None
        self._on_success = lambda added: self._case_added(added, folder)
        self._on_failure = lambda error: self._case_refused(error, folder, case_id) if isinstance(error, DataFolderError) else None
        return self.runner.start(
            add_case,
            folder,
            case_id,
            np.asarray(ct.data),
            geometry,
            lung=None if lung is None else np.array(lung.data, copy=True),
            infection=None if infection is None else np.array(infection.data, copy=True),
            status=f"Adding case '{case_id}'...",
        )

    def _case_refused(self, error, folder, case_id):
        notify_error(error)
        self.status.setText(str(error))
        try:
            self.case_edit.setText(suggest_case_id(folder, case_id))
        except OSError:
            pass

    def _case_added(self, added, folder):
        masks = " and ".join(n for n, p in (("lung", added.lung_path), ("infection", added.infection_path)) if p)
        self.status.setText(
            f"Added case '{added.case_id}' (CT + {masks}) to {folder}; "
            f"the folder now holds {added.n_cases} case{'s' if added.n_cases != 1 else ''}."
        )

    # --- runner callbacks ---------------------------------------------------------------------
    def _succeeded(self, result):
        if self._on_success is not None:
            self._on_success(result)

    def _failed(self, error):
        self.status.setText(error_text(error))
        if self._on_failure is not None:
            self._on_failure(error)

    def _finished(self):
        self.runner.setVisible(False)
        self._on_success = self._on_failure = None
