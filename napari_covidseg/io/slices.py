"""8-bit slice images (PNG, JPEG, TIFF): one file, a multi-page TIFF, or a folder of numbered slices.

This is how most public COVID-19 CT data is published: display images after a windowing the
publisher chose, so the values are not Hounsfield units (domain ``"display8"``, see
:mod:`napari_covidseg.intensity`) and the files carry no voxel size (``spacing_known`` False, 1 mm
as a placeholder).

What :func:`read_slices` guarantees: grey values only (an RGB file whose three channels are equal
is grey; a colour image is refused), 8-bit images, or masks with a few integer labels in any
integer type (16-bit or float images are refused: nothing in a PNG/TIFF says how they map to HU);
the slices of a folder are ordered by the number in their file names (``ct_9.png`` before
``ct_10.png``), all of one series (one name pattern, one size), each number once; gaps in the
numbering are reported in ``notes``.  The images are taken as displayed: row 0 is anterior (top),
column 0 is the patient's right, slice order is the numbering.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..errors import InputError
from .geometry import Geometry
from .volume import RawVolume, check_size, looks_like_labels

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def is_slice_path(path) -> bool:
    """True if the file name ends in a slice image suffix (case-insensitive)."""
    return str(path).lower().endswith(SLICE_SUFFIXES)


def _number(path: Path) -> Optional[int]:
    found = _LAST_NUMBER.search(path.stem)
    return int(found.group(1)) if found else None


def _pattern(path: Path) -> str:
    return _LAST_NUMBER.sub("#", path.stem) + path.suffix.lower()


def numbered_files(folder: Path) -> Tuple[List[Path], List[str]]:
    """The slice images of ``folder`` in the order of their numbers, and notes on gaps."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and is_slice_path(p) and not p.name.startswith(".")]
    if not files:
        raise InputError(f"{folder.name} holds no slice images (.png, .jpg, .tif) and no DICOM files.")
    patterns = sorted({_pattern(p) for p in files})
    if len(patterns) > 1:
        raise InputError(f"{folder.name} mixes several image series ({', '.join(patterns[:4])}): put each series "
                         "(the CT, each mask) in its own folder, or open one file.")
    if len(files) == 1:
        return files, []
    numbers = [_number(p) for p in files]
    seen = {}
    for path, number in zip(files, numbers):
        if number in seen:
            raise InputError(f"{folder.name}: {seen[number].name} and {path.name} have the same slice number {number}: "
                             "keep one of them.")
        seen[number] = path
    order = sorted(seen)
    missing = sorted(set(range(order[0], order[-1] + 1)) - set(order))
    notes = [f"slice numbers {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''} are missing "
             "from the folder: neighbouring slices may be further apart than they look"] if missing else []
    return [seen[n] for n in order], notes


#: largest difference between the red, green and blue of a grey pixel (JPEG colour rounding)
GREY_TOLERANCE = 3


def _grey(array: np.ndarray, components: int, name: str) -> np.ndarray:
    """A grey array from grey+alpha, RGB or RGBA data (channels last); colour is refused."""
    if components == 2:
        return array[..., 0]
    rgb = array[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    wide = rgb.astype(np.int32)
    if int((wide.max(axis=-1) - wide.min(axis=-1)).max()) > GREY_TOLERANCE:
        raise InputError(f"{name} is a colour image (its red, green and blue differ): covidseg reads grey CT "
                         "slices; export the slices in grey levels.")
    return np.round(wide.mean(axis=-1)).astype(rgb.dtype)


def read_image(path: Path) -> np.ndarray:
    """One PNG/JPEG/TIFF file as a (pages, rows, cols) grey array (pages is 1 except in a multi-page TIFF)."""
    import SimpleITK as sitk

    from .itk import bytes_per_voxel, itk_reason

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        png = path.suffix.lower() == ".png"  # deflate-compressed: its size bounds what it can hold
        check_size(reader.GetSize(), bytes_per_voxel(reader.GetPixelID()) * reader.GetNumberOfComponents(), path.name,
                   stored=path.stat().st_size if png else None, encoding="deflate" if png else "other")
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path.name} could not be read as an image ({itk_reason(exc)}): it may be truncated or "
                         "another format renamed; export it again.") from None
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        array = _grey(array, components, path.name)
    return array.reshape((-1,) + array.shape[-2:])


def _stack(files: List[Path]) -> np.ndarray:
    if len(files) == 1:
        return read_image(files[0])
    first = read_image(files[0])
    stack = np.empty((len(files),) + first.shape[1:], first.dtype)
    for k, path in enumerate(files):
        image = first if k == 0 else read_image(path)
        if image.shape != first.shape or image.dtype != first.dtype:
            raise InputError(f"{path.name} is {image.shape[1:]} {image.dtype} but {files[0].name} is "
                             f"{first.shape[1:]} {first.dtype}: the slices of one series must all have the same size "
                             "and type (a multi-page TIFF cannot be one slice of a folder).")
        stack[k] = image[0]
    return stack


def _check_values(stack: np.ndarray, name: str) -> np.ndarray:
    if stack.dtype == np.uint8 or stack.dtype == bool:
        return stack.astype(np.uint8, copy=False)
    if np.issubdtype(stack.dtype, np.floating) and np.array_equal(stack, np.round(stack)) and stack.size:
        stack = stack.astype(np.int64)
    if np.issubdtype(stack.dtype, np.integer) and looks_like_labels(stack):
        return stack
    raise InputError(
        f"{name} holds {stack.dtype} values ({float(stack.min()):g}..{float(stack.max()):g}), not 8-bit: slice images "
        "record no rescale to Hounsfield units, so covidseg reads only 8-bit display images (and masks) from "
        "PNG/JPEG/TIFF. Open the original DICOM series or a NIfTI in HU instead."
    )


def read_slices(path) -> RawVolume:
    """A slice image file or a folder of numbered slices as a volume (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files, notes = numbered_files(path)
    elif path.is_file():
        files, notes = [path], []
    else:
        raise InputError(f"{path} does not exist: check the path and the file name.")
    stack = _check_values(_stack(files), path.name)  # (z, y, x): the display order
    geometry = Geometry.from_display_spacing(stack.shape, (1.0, 1.0, 1.0))
    geometry.source_path = str(path.resolve())
    return RawVolume(values=stack.transpose(2, 1, 0), geometry=geometry, name=path.name, source_format="slices",
                     spacing_known=False, unit_spacing=True, notes=notes)
