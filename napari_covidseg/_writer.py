"""napari writer hooks: save a mask or an image on the grid of the CT it belongs to.

The format is the file name's (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); a name without one of
these gets the CT's own format where it holds labels (NIfTI, NRRD, MetaImage) and ``.nii.gz``
otherwise (a CT from DICOM or slice images), see :func:`napari_covidseg.io.loader.mask_suffix`.
The layer's ``metadata[GEOMETRY_KEY]`` (set by the reader on the CT and copied to every layer
derived from it) gives the affine, header and voxel order, so the saved mask overlays the original
CT in any other tool.  A layer without geometry is saved with a plain affine from its ``scale``
and a warning, because its position relative to any CT is then unknown.

The CT a layer came from is never overwritten, whatever name the user picks.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .errors import InputError
from .io.geometry import GEOMETRY_KEY, Geometry
from .io.loader import WRITABLE_SUFFIXES, load_any, mask_suffix, save_any
from .io.nifti import KIND_LABELS, SOURCE_PATH_KEY


class GeometryMissingWarning(UserWarning):
    """The layer had no CT geometry; it was saved with an affine built from its scale."""


def _same_file(a, b) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _target_path(path, meta: Dict[str, Any]) -> Path:
    """``path``, with the source CT's format suffix added where it names no format we write."""
    path = Path(path).expanduser()
    if not path.name.lower().endswith(WRITABLE_SUFFIXES):
        sources = _source_paths(meta)
        path = path.with_name(path.name + mask_suffix(sources[0] if sources else None))
    return path


def _layer_geometry(data: np.ndarray, meta: Dict[str, Any], what: str) -> Geometry:
    metadata = meta.get("metadata") or {}
    geometry = metadata.get(GEOMETRY_KEY)
    name = meta.get("name", what)
    if isinstance(geometry, Geometry):
        if tuple(geometry.display_shape) != tuple(data.shape):
            raise InputError(
                f"'{name}' has shape {tuple(data.shape)} but the CT geometry it carries is for shape "
                f"{tuple(geometry.display_shape)}: it cannot be saved on that CT's grid. "
                "Save a layer made from this CT."
            )
        return geometry
    scale = tuple(meta.get("scale") or (1.0, 1.0, 1.0))[-3:]
    warnings.warn(
        f"'{name}' carries no CT geometry (it was not made from a CT opened with napari-covidseg), "
        f"so it is saved with voxel size {scale} mm and no position/orientation of its own: it may not "
        "overlay the CT in other tools. Copy the CT layer's metadata to it, or use the Save widget.",
        GeometryMissingWarning,
        stacklevel=3,
    )
    return Geometry.from_display_spacing(data.shape, scale)


def _source_paths(meta: Dict[str, Any]) -> List[str]:
    metadata = meta.get("metadata") or {}
    paths = []
    geometry = metadata.get(GEOMETRY_KEY)
    if isinstance(geometry, Geometry) and geometry.source_path:
        paths.append(geometry.source_path)
    if metadata.get(SOURCE_PATH_KEY):
        paths.append(str(metadata[SOURCE_PATH_KEY]))
    return paths


def _is_mask_file(path: Path) -> bool:
    try:
        return load_any(path).kind == KIND_LABELS
    except InputError:
        return False


def _layer_array(data, what: str) -> np.ndarray:
    if isinstance(data, (list, tuple)):  # multiscale: the full-resolution level
        data = data[0]
    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"Only 3D {what}s can be saved; this one has shape {array.shape}.")
    return array


def write_labels(path: str, data: Any, meta: Dict[str, Any]) -> List[str]:
    """Save a Labels layer as a mask with its CT's geometry; returns the written path."""
    target = _target_path(path, meta)
    array = _layer_array(data, "mask")
    for source in _source_paths(meta):
        # a mask may be saved over the mask file it was read from, never over a CT
        if _same_file(target, source) and not _is_mask_file(target):
            raise InputError(
                f"{target} is the CT this mask belongs to; it is never overwritten. Choose another file name."
            )
    geometry = _layer_geometry(array, meta, "mask")
    save_any(target, array, geometry, overwrite=True)
    return [str(target)]


def write_image(path: str, data: Any, meta: Dict[str, Any]) -> List[str]:
    """Save an Image layer with its source geometry; never over its source file."""
    target = _target_path(path, meta)
    array = _layer_array(data, "image")
    for source in _source_paths(meta):
        if _same_file(target, source):
            raise InputError(
                f"{target} is the file this image was read from; it is never overwritten. "
                "Choose another file name."
            )
    geometry = _layer_geometry(array, meta, "image")
    save_any(target, array, geometry, overwrite=True)
    return [str(target)]
