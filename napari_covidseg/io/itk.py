"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) volumes through SimpleITK.

Reading guarantees: one 3D scalar volume (a trailing time axis of length 1 is dropped; colour,
vector, 2D and multi-volume files are refused with the reason), not larger than memory, finite
values in the smallest exact dtype, and the geometry of the header: SimpleITK gives spacing,
origin and direction in LPS+, turned here into the RAS+ affine of
:class:`~napari_covidseg.io.geometry.Geometry`, so the same image read from NIfTI, NRRD or MHA
has the same display array and the same affine.

Writing (:func:`save_volume`) puts a display array back in the file's axis order with the
geometry's spacing, origin and direction, compressed, atomically, never over an existing file
unless asked.  Only the single-file variants (``.nrrd``, ``.mha``) are written: a header plus a
separate data file cannot appear atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..atomic_file import atomic_path
from ..errors import InputError
from .geometry import Geometry, lps_to_ras
from .output import prepare_output, refuse_if_appeared
from .volume import RawVolume, check_geometry, check_size, exact_values, require_regular_file, squeeze_to_3d

#: suffix -> format name
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}
#: suffixes :func:`save_volume` writes (one file each)
WRITABLE_SUFFIXES = (".nrrd", ".mha")
FORMAT_TITLES = {"nrrd": "NRRD", "metaimage": "MetaImage"}


def itk_format(path) -> str:
    """``"nrrd"``, ``"metaimage"`` or ``""`` from the file name."""
    return ITK_SUFFIXES.get(Path(str(path)).suffix.lower(), "")


def itk_reason(exc: BaseException) -> str:
    """The useful line of an ITK exception (they span lines and name C++ source files)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception thrown", "/"))] or lines[-1:]
    text = " ".join(useful)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        text = text.split("):", 1)[1] if "):" in text else text  # drop "NrrdImageIO(0x55...)"
    text = " ".join(text.split()).replace("sitk::ERROR: ", "")
    return text[:240] + ("..." if len(text) > 240 else "")


# --- geometry ------------------------------------------------------------------------------
def geometry_from_sitk(image, source_path=None) -> Geometry:
    """:class:`Geometry` of a 3D SimpleITK image (or reader after ``ReadImageInformation``)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return Geometry(affine=lps_to_ras(lps), file_shape=tuple(image.GetSize())[:3], source_path=source_path)


def sitk_frame(geometry: Geometry, name: str) -> Tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in LPS+ for SimpleITK; refuses sheared geometry it cannot hold."""
    lps = lps_to_ras(geometry.affine)
    matrix = lps[:3, :3]
    spacing = np.sqrt((matrix ** 2).sum(axis=0))
    direction = matrix / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(
            f"{name}: the CT's voxel axes are not perpendicular (a gantry-tilted DICOM series), which "
            "NRRD and MetaImage cannot store; save the mask as NIfTI (.nii.gz), which keeps the tilt."
        )
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


# --- reading -------------------------------------------------------------------------------
def _header(path: Path, title: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"{path.name} could not be read as {title} ({itk_reason(exc)}). It may be truncated, corrupt, "
            "or another format renamed; check the file or export it again."
        ) from None
    return reader


def _checked_shape(reader, name: str) -> Tuple[int, int, int]:
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{name} stores {reader.GetNumberOfComponents()} values per voxel (colour or vector data), not grey "
            "values: export the CT as a single-channel image in Hounsfield units."
        )
    return squeeze_to_3d(reader.GetSize(), name)


#: how a header names the voxel data's encoding, by format -> (key, {value: encoding for check_size})
_ENCODINGS = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "true": "deflate", "false": "raw"}


def _header_fields(path: Path) -> Tuple[dict, int]:
    """The ``key: value`` (NRRD) or ``Key = Value`` (MetaImage) fields of a header and its length in bytes."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    nrrd = itk_format(path) == "nrrd"
    fields, length = {}, 0
    for line in head.split(b"\n"):
        length += len(line) + 1
        text = line.decode("latin-1").strip()
        if nrrd and not text and fields:
            break  # a blank line ends a NRRD header
        key, sep, value = text.partition(":" if nrrd else "=")
        if sep and not text.startswith("#"):
            fields[key.strip().lower().replace(" ", "")] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break  # the last MetaImage field: binary data follows
    return fields, length


def stored_voxel_bytes(path: Path) -> Tuple[Optional[int], str]:
    """(bytes the file holds for the voxels, encoding for :func:`check_size`), or (None, "other") where
    that cannot be told (a list of data files, bzip2, text); the data file a header names must be a regular file."""
    fields, header_length = _header_fields(path)
    if itk_format(path) == "nrrd":
        encoding = _ENCODINGS.get(fields.get("encoding", "raw").lower(), "other")
        data_file = fields.get("datafile")
    else:
        encoding = _ENCODINGS.get(fields.get("compresseddata", "false").lower(), "other")
        data_file = fields.get("elementdatafile")
        data_file = None if data_file is None or data_file.upper() == "LOCAL" else data_file
    if data_file is None:
        return path.stat().st_size - header_length, encoding
    if data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file:
        return None, "other"
    target = path.parent / data_file
    if not target.exists():
        raise InputError(f"{path.name} names the data file {data_file}, which does not exist next to it: copy the "
                         "header together with its data file.")
    return require_regular_file(target, "data file").stat().st_size, encoding


def bytes_per_voxel(pixel_id: int) -> int:
    """Size of one voxel of a SimpleITK pixel type (from a 1-voxel image: no table to keep in sync)."""
    import SimpleITK as sitk

    return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).itemsize)


def read_itk(path) -> RawVolume:
    """The voxels and geometry of a 3D NRRD or MetaImage file, before the shared checks."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    fmt = itk_format(path)
    title = FORMAT_TITLES.get(fmt, "NRRD or MetaImage")
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file: check the path and the file name.")
    require_regular_file(path, f"{title} file")
    reader = _header(path, title)
    shape = _checked_shape(reader, path.name)
    check_geometry(geometry_from_sitk(reader), path.name)  # before SimpleITK reads (and may refuse) the voxels
    stored, encoding = stored_voxel_bytes(path)
    check_size(shape, bytes_per_voxel(reader.GetPixelID()), path.name, stored=stored, encoding=encoding)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"The voxel data of {path.name} could not be read ({itk_reason(exc)}): the file (or the data file its "
            "header names) is probably missing, truncated or corrupt. Copy it again."
        ) from None
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    values = exact_values(sitk.GetArrayFromImage(image).transpose(2, 1, 0), path.name)
    geometry = geometry_from_sitk(image, source_path=str(path.resolve()))
    unit_spacing = all(float(s) == 1.0 for s in image.GetSpacing())
    return RawVolume(values=values, geometry=geometry, name=path.name, source_format=fmt or "nrrd",
                     unit_spacing=unit_spacing)


# --- writing -------------------------------------------------------------------------------
def save_volume(path, display_array, geometry: Geometry, overwrite: bool = False) -> Path:
    """Write a display-ordered (z, y, x) array as ``.nrrd`` or ``.mha`` on ``geometry``'s grid.

    Same contract as :func:`napari_covidseg.io.nifti.save_volume`: the source's voxel order and
    geometry, compressed, atomic, an existing file replaced only with ``overwrite=True``.
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        hint = {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix)
        raise InputError(
            f"{path.name}: covidseg writes NRRD and MetaImage as single files ending in .nrrd or .mha"
            + (f"; choose {path.stem}{hint}" if hint else "")
            + "."
        )
    path, file_array = prepare_output(path, display_array, geometry, overwrite, FORMAT_TITLES[ITK_SUFFIXES[suffix]])
    spacing, origin, direction = sitk_frame(geometry, path.name)
    image = sitk.GetImageFromArray(np.ascontiguousarray(file_array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with atomic_path(path, suffix=f".part{suffix}", before_replace=refuse_if_appeared(path, overwrite)) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path
