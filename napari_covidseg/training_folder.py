"""Add a corrected case (CT + masks) to a training folder in the ``pairs`` layout.

The ``pairs`` layout (see ``docs/ARCHITECTURE.md``) is what ``training/datasets.py`` reads::

    <folder>/images/<case>.nii.gz       the CT, with its own geometry
    <folder>/lung/<case>.nii.gz         optional binary lung mask
    <folder>/infection/<case>.nii.gz    optional binary infection mask

A case needs an image and at least one mask.  Corrections made in the GUI become training data
here, so this module never overwrites an existing case (a user re-adding "case01" by mistake
would otherwise silently lose earlier work): it refuses and suggests a free id instead.  Masks
are stored binary (any non-zero voxel = foreground) because that is what the layout promises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import CancelledError, DataFolderError, InputError
from .io.geometry import Geometry

IMAGES_DIR = "images"
LUNG_DIR = "lung"
INFECTION_DIR = "infection"
SUFFIX = ".nii.gz"
_CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class AddedCase:
    """Where the files of a newly added case went, and how many cases the folder now holds."""

    case_id: str
    image_path: Path
    lung_path: Optional[Path]
    infection_path: Optional[Path]
    n_cases: int


def case_id_from_name(name: str) -> str:
    """A filesystem-safe case id from a layer or file name ("CT 01.nii.gz" -> "CT_01")."""
    stem = str(name).strip()
    for ext in (".nii.gz", ".nii"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "case"


def validate_case_id(case_id: str) -> str:
    """Return ``case_id`` stripped, or raise :class:`InputError` if it cannot be a file name."""
    case_id = str(case_id).strip()
    if not _CASE_ID_PATTERN.match(case_id) or case_id.lower().endswith((".nii", ".nii.gz")):
        raise InputError(
            f"'{case_id}' cannot be used as a case id: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit) and no .nii/.nii.gz ending, e.g. 'patient01'."
        )
    return case_id


def _case_files(folder: Path, case_id: str) -> List[Path]:
    return [folder / sub / f"{case_id}{SUFFIX}" for sub in (IMAGES_DIR, LUNG_DIR, INFECTION_DIR)]


def case_exists(folder, case_id: str) -> bool:
    """True if any file of ``case_id`` (image or mask) is already in ``folder``."""
    return any(p.exists() for p in _case_files(Path(folder), case_id))


def suggest_case_id(folder, case_id: str) -> str:
    """``case_id`` if free, else the first free ``<case_id>_2``, ``<case_id>_3``, ..."""
    if not case_exists(folder, case_id):
        return case_id
    k = 2
    while case_exists(folder, f"{case_id}_{k}"):
        k += 1
    return f"{case_id}_{k}"


def list_cases(folder) -> List[str]:
    """Case ids in ``folder`` that form a usable case: an image plus at least one mask."""
    folder = Path(folder)
    images = folder / IMAGES_DIR
    if not images.is_dir():
        return []
    cases = []
    for image in sorted(images.glob(f"*{SUFFIX}")):
        case_id = image.name[: -len(SUFFIX)]
        if any((folder / sub / image.name).exists() for sub in (LUNG_DIR, INFECTION_DIR)):
            cases.append(case_id)
    return cases


def _binary_mask(mask, shape, what: str) -> Optional[np.ndarray]:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(
            f"The {what} mask has shape {mask.shape} but the CT has shape {tuple(shape)}: "
            f"pick the {what} layer that was made from this CT."
        )
    return (mask != 0).astype(np.uint8)


def add_case(
    folder, case_id: str, image, geometry: Geometry, lung=None, infection=None, progress=None, should_cancel=None
) -> AddedCase:
    """Write a case (display-ordered CT and masks, saved with ``geometry``) into ``folder``.

    Raises :class:`InputError` for a bad id, missing masks or mismatched shapes and
    :class:`DataFolderError` if the case id is taken (the message names a free id).  If writing
    fails half way (or ``should_cancel()`` turns true between files, which raises
    :class:`CancelledError`) the files already written for this case are removed, so the folder
    never holds a half case that would break training.  ``progress(done, total)`` is called
    after each file (compressing a full-size CT takes seconds).
    """
    from .io.nifti import save_volume  # imported here: nibabel I/O is only needed when saving

    folder = Path(folder)
    case_id = validate_case_id(case_id)
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"The CT must be a 3D volume, got an array of shape {image.shape}.")
    if lung is None and infection is None:
        raise InputError("Choose a lung mask, an infection mask or both: a training case needs at least one mask.")
    lung_mask = _binary_mask(lung, image.shape, "lung")
    infection_mask = _binary_mask(infection, image.shape, "infection")
    if folder.exists() and not folder.is_dir():
        raise DataFolderError(f"{folder} is a file, not a folder: choose a folder for the training data.")
    if case_exists(folder, case_id):
        raise DataFolderError(
            f"Case '{case_id}' already exists in {folder}; nothing was written. "
            f"Use another case id, e.g. '{suggest_case_id(folder, case_id)}'."
        )

    image_path, lung_path, infection_path = _case_files(folder, case_id)
    planned = [(image_path, image), (lung_path, lung_mask), (infection_path, infection_mask)]
    planned = [(path, array) for path, array in planned if array is not None]
    written: List[Path] = []
    try:
        for path, array in planned:
            if should_cancel is not None and should_cancel():
                raise CancelledError(f"Adding case '{case_id}' was cancelled; nothing was kept.")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_volume(path, array, geometry, overwrite=False)
            written.append(path)
            if progress is not None:
                progress(len(written), len(planned))
    except BaseException:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        raise
    return AddedCase(
        case_id=case_id,
        image_path=image_path,
        lung_path=lung_path if lung_mask is not None else None,
        infection_path=infection_path if infection_mask is not None else None,
        n_cases=len(list_cases(folder)),
    )
