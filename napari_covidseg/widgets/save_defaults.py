"""What Save and Add-to-training choose when the user has not said: the corrected mask, a name
that says what it is, and a folder that is not a training folder.

* The mask: the one with hand edits (:func:`edits.is_edited`), else a network's prediction, else
  any mask that does not look like a ground truth; a ground truth only when nothing else is open.
* The name: ``<case>_<class>_corrected`` in the CT's own format where it holds labels (NIfTI,
  NRRD, MHA) and NIfTI otherwise (DICOM, slices), e.g. ``cc01_infection_corrected.nii.gz``.
* The folder: the CT's folder, unless it is part of a training folder (``images/``, ``lung/``,
  ``infection/``, the Zenodo ``*_Mask`` folders): a mask saved there would be read as a training
  case (or break one), so the training folder's root is proposed, where no layout reads loose files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..intensity import DISPLAY8_LAYER_NOTE
from ..training_folder import case_id_from_name
from .edits import is_edited
from .layer_style import class_of_text

TRAINING_IMAGE_FOLDERS = ("images", "image", "imagestr", "covid-19-ct-seg_20cases", "tr_im", "rp_im")


def looks_like_ground_truth(layer) -> bool:
    words = layer.name.lower().replace("_", " ").replace("-", " ").split()
    return any(w in ("gt", "truth", "ground", "manual", "reference") for w in words)


def mask_score(layer) -> int:
    """How likely ``layer`` is the mask to save: 3 edited, 2 a prediction, 1 other, 0 a ground truth."""
    if is_edited(layer):
        return 3
    if "covidseg_source" in (layer.metadata or {}):
        return 2
    return 0 if looks_like_ground_truth(layer) else 1


def reference_score(cls: Optional[str] = None):
    """Ground-truth pick (of class ``cls``, or any): a mask named as a ground truth, else any mask
    that no network made here (a reference opened from a file); never a grid-tile copy."""
    def score(layer) -> int:
        metadata = layer.metadata or {}
        if metadata.get("covidseg_source") or metadata.get("covidseg_side_by_side"):
            return 0
        if cls is not None and class_of_text(layer.name) != cls:
            return 0
        return 2 if looks_like_ground_truth(layer) else 1
    return score


def mask_class(layer) -> Optional[str]:
    source = (layer.metadata or {}).get("covidseg_source") or {}
    return source.get("class") or class_of_text(layer.name)


def class_mask_score(cls: str):
    """Score for the training folder's ``cls`` mask: the corrected one of that class first."""
    def score(layer) -> int:
        return 0 if mask_class(layer) != cls else 1 + mask_score(layer)
    return score


def case_of(ct_layer) -> str:
    name = ct_layer.name
    if name.endswith(DISPLAY8_LAYER_NOTE):
        name = name[: -len(DISPLAY8_LAYER_NOTE)]
    return case_id_from_name(name)


def is_training_subfolder(folder: Path) -> bool:
    """``folder`` is the image or mask folder of a training folder (its parent is the training root):
    ``images/`` (or the Zenodo image folder), or a class folder with an image or class sibling."""
    if folder.name.lower() in TRAINING_IMAGE_FOLDERS:
        return True
    if class_of_text(folder.name) is None:
        return False
    try:
        siblings = [p.name for p in folder.parent.iterdir() if p.is_dir() and p != folder]
    except OSError:
        return False
    return any(class_of_text(s) or s.lower() in TRAINING_IMAGE_FOLDERS for s in siblings)


def default_folder(source_path: Optional[str]) -> Path:
    """Where to propose saving a mask of the CT read from ``source_path`` (a file, or a DICOM
    series folder): next to it, but outside a training folder."""
    if not source_path:
        return Path.cwd()
    folder = Path(source_path).parent
    return folder.parent if is_training_subfolder(folder) else folder


def default_name(ct_layer, mask_layer, suffix: str) -> str:
    cls = mask_class(mask_layer) or "mask"
    return f"{case_of(ct_layer)}_{cls}_corrected{suffix}"
