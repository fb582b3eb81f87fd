"""napari reader hook: open a chest CT or mask as a correctly oriented, scaled layer.

Everything :func:`napari_covidseg.io.loader.load_any` reads opens here: NIfTI, NRRD, MetaImage,
DICOM (a folder, a .zip of one, a .dcm file of a series, a DICOMDIR), 8-bit PNG/JPEG/TIFF slices
(a file or a folder of numbered slices).  A DICOM source gives one layer per CT series, named with
the series number and description; the series that cannot be opened (localizer, secondary
capture, another modality, ...) are named in one warning with the reason.

A CT becomes an Image layer in the lung window with ``scale`` = voxel spacing (so distances and
aspect ratio are in mm) and the :class:`~napari_covidseg.io.geometry.Geometry` in its metadata (so
masks made from it can be saved back onto the CT's grid); a mask becomes a Labels layer.

An 8-bit display image (0..255, e.g. a PNG/JPG release converted to NIfTI) opens in its own
domain: the layer name ends in "[8-bit, not HU]", its contrast spans 0..255, one notification
says that HU cannot be read from it, and ``metadata`` records the domain and whether the spacing
is a placeholder, for every widget that derives layers or numbers from it.

A file the user cannot use (truncated, unknown format, 4D, not in HU, ...) is reported with a napari
notification and no layer; the reader then returns napari's "read, but nothing to add" sentinel
``[(None,)]`` so napari neither raises nor asks another reader.  napari's builtin reader also
claims some of these suffixes (.nii, .dcm, .png, .tif, folders): napari then asks which reader to
use (and can remember the choice); ``viewer.open(path, plugin="napari-covidseg")`` picks this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np

from .errors import CovidsegError
from .intensity import DISPLAY8, DISPLAY8_LAYER_NOTE, DOMAIN_KEY
from .io.geometry import GEOMETRY_KEY, SPACING_KNOWN_KEY, Geometry
from .io.loader import can_open, load_all, volume_stem
from .io.nifti import KIND_LABELS, SOURCE_PATH_KEY, Volume
from .widgets.layer_style import case_layer_name, class_of_text, mask_class, reference_color_dict
from .windowing import default_contrast_limits

#: napari's documented value for "the file was handled but there is no layer to add"
NO_LAYERS = [(None,)]

PathOrPaths = Union[str, Sequence[str]]


def get_reader(path: PathOrPaths):
    """Return :func:`read_volumes` if every path is something the loader reads, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_can_open(p) for p in paths):
        return None
    return read_volumes


def _can_open(path) -> bool:
    try:
        return can_open(path)
    except OSError:  # an unreadable folder: not ours to open
        return False


def layer_name(path) -> str:
    """File name without its format suffix (.nii.gz, .nrrd, .png, .zip, ...); a folder's name."""
    return volume_stem(path)


def series_layer_name(path, volume: Volume) -> str:
    """Layer name of a volume read from ``path``: with the DICOM series it is, where it is one; a
    mask in a class folder is named with its case and class ("cc01 lung" for ``lung/cc01.nii.gz``)."""
    name = case_layer_name(layer_name(path), path, volume.kind == KIND_LABELS)
    return f"{name} {volume.description}" if volume.description else name


def volume_layer_data(volume: Volume, name: str) -> Tuple[Any, Dict[str, Any], str]:
    """napari LayerData tuple of a loaded volume (used by the reader and the CLI)."""
    metadata = {GEOMETRY_KEY: volume.geometry, SOURCE_PATH_KEY: volume.source_path,
                SPACING_KNOWN_KEY: volume.spacing_known}
    kwargs: Dict[str, Any] = {"name": name, "scale": tuple(volume.spacing), "metadata": metadata}
    if volume.kind == KIND_LABELS:  # a reference mask: fixed colour of its class, none a prediction uses
        kwargs["colormap"] = reference_color_dict(mask_class(volume.source_path or name) or class_of_text(name))
        return volume.data, kwargs, "labels"
    metadata[DOMAIN_KEY] = volume.domain
    if volume.domain == DISPLAY8:
        kwargs["name"] = name + DISPLAY8_LAYER_NOTE
    kwargs.update(colormap="gray", contrast_limits=default_contrast_limits(volume.domain), interpolation2d="nearest")
    return volume.data, kwargs, "image"


def display8_note(name: str, spacing_known: bool) -> str:
    """The one notification an 8-bit image gets when it opens."""
    return (f"{name} is an 8-bit display image (0..255), not a CT in Hounsfield units: its grey values were "
            "windowed by whoever published it, so no HU can be read from it and the window presets are display "
            "presets. The shipped networks segment it (they were trained on such images)."
            + ("" if spacing_known else " Its voxel size is a placeholder (1 mm): sizes are given in voxels, not mm or mL."))


def read_volumes(path: PathOrPaths):
    """Read one or several paths (files, folders, archives); unusable ones are reported, never raised."""
    from napari.utils.notifications import show_error, show_warning  # napari only where napari runs

    paths = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    layers = []
    for p in paths:
        try:
            volumes, problems = load_all(p)
        except CovidsegError as error:
            show_error(f"Cannot open {Path(p).name}: {error}")
            continue
        if problems:
            notify = show_warning if volumes else show_error
            notify(f"{Path(p).name}: not opened: " + " | ".join(problems))
        for volume in volumes:
            name = series_layer_name(p, volume)
            for note in volume.notes:
                show_warning(f"{name}: {note}")
            if volume.kind == KIND_LABELS:
                _warn_if_mask_fits_no_open_ct(volume, Path(p).name)
            elif volume.domain == DISPLAY8:
                from napari.utils.notifications import show_info

                show_info(display8_note(Path(p).name, volume.spacing_known))
            layers.append(volume_layer_data(volume, name))
    return layers or NO_LAYERS


#: the manifest's command has kept this name since NIfTI was the only format
read_nifti = read_volumes


def _warn_if_mask_fits_no_open_ct(mask: Volume, name: str) -> None:
    """A mask opened next to CTs it does not fit is shown anyway, with a warning saying so."""
    import napari
    from napari.utils.notifications import show_warning

    viewer = napari.current_viewer()
    if viewer is None:
        return
    ct_geometries = [
        (layer.name, layer.metadata[GEOMETRY_KEY])
        for layer in viewer.layers
        if layer.__class__.__name__ == "Image" and isinstance(layer.metadata.get(GEOMETRY_KEY), Geometry)
    ]
    if not ct_geometries:
        return
    for _, geometry in ct_geometries:
        if tuple(geometry.display_shape) == tuple(mask.data.shape) and np.allclose(
            geometry.affine, mask.geometry.affine, atol=1e-3
        ):
            return
    names = ", ".join(f"'{n}' {tuple(g.display_shape)}" for n, g in ct_geometries)
    show_warning(
        f"The mask {name} {tuple(mask.data.shape)} does not lie on the grid of any open CT ({names}): "
        "it will not overlay correctly and cannot be compared with them. Open the mask made from this CT."
    )
