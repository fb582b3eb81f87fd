"""What every volume writer checks before it writes, whatever the format.

A writer (:func:`napari_covidseg.io.nifti.save_volume`, :func:`napari_covidseg.io.itk.save_volume`)
calls :func:`prepare_output` and then writes the file-ordered array it returns under a temporary
name with :func:`napari_covidseg.atomic_file.atomic_path`, passing :func:`refuse_if_appeared` as the
last check before the rename.  So no format ever replaces a file it was not asked to replace,
writes half a file, or puts a mask on another grid than its CT's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import numpy as np

from ..errors import InputError
from .geometry import Geometry


class OutputExistsError(InputError, FileExistsError):
    """The destination file exists and overwriting was not asked for."""


def storage_array(display_array: np.ndarray, what: str = "NIfTI") -> np.ndarray:
    """The array in a dtype every reader understands (bool and 64-bit types narrowed)."""
    arr = np.asarray(display_array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64, np.int32, np.uint32) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return arr.astype(dtype)
        raise InputError(f"Values {lo}..{hi} do not fit a 32-bit integer {what} file.")
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise InputError(f"Cannot save an array of type {arr.dtype} as {what}: convert it to numbers first.")
    return arr


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse a folder, a missing parent folder, or an existing file not meant to be replaced."""
    if path.is_dir():
        raise InputError(f"{path} is a folder: choose a file name inside it.")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and was not overwritten: choose another file name "
            "(or confirm overwriting it)."
        )
    if not path.parent.is_dir():
        raise InputError(f"The folder {path.parent} does not exist: create it or choose another folder.")


def prepare_output(path, display_array, geometry: Geometry, overwrite: bool, what: str) -> Tuple[Path, np.ndarray]:
    """Checked target path and the array in ``geometry``'s file axis order, ready to write."""
    path = Path(path).expanduser()
    check_target(path, overwrite)
    arr = storage_array(display_array, what)
    if arr.ndim != 3:
        raise InputError(f"Only 3D volumes can be saved; this array has shape {arr.shape}.")
    if tuple(arr.shape) != tuple(geometry.display_shape):
        raise InputError(
            f"The array has shape {tuple(arr.shape)} (z, y, x) but the CT geometry has shape "
            f"{tuple(geometry.display_shape)}: save it with the geometry of the CT it was made from."
        )
    return path, np.ascontiguousarray(geometry.from_display(arr))


def refuse_if_appeared(path: Path, overwrite: bool) -> Callable[[], None]:
    """``before_replace`` hook: refuse a target that appeared while the file was being written."""

    def check():
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} appeared while saving and was not overwritten: choose another name.")

    return check
