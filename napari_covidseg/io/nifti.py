"""Load and save chest CT and masks as NIfTI without losing or moving a voxel.

``load_volume`` turns a ``.nii`` / ``.nii.gz`` file into a display-ordered (z, y, x) array plus
the :class:`~napari_covidseg.io.geometry.Geometry` needed to put it back, and decides whether it
is a CT (``kind="image"``) or a mask (``kind="labels"``).  A CT is in one of two intensity domains
(:mod:`napari_covidseg.intensity`): Hounsfield units, or an 8-bit display image (0..255, e.g. a
PNG/JPG release converted to NIfTI); ``Volume.domain`` says which, and ``Volume.spacing_known``
says whether the voxel size is a measurement or the 1 mm placeholder such conversions write.  Everything a user can
get wrong (a truncated download, a PNG stack converted to NIfTI, a 4D series, a normalised image)
is caught here and reported as an :class:`~napari_covidseg.errors.InputError` whose message says
what is wrong and what to do, so the GUI and the CLI never show a traceback.  The checks every
format shares live in :mod:`.volume`; :func:`napari_covidseg.io.loader.load_any` is the entry point
that reads NIfTI through :func:`read_nifti` and the other formats through their own modules.

``save_volume`` writes a display array back in the *file's own* voxel order with the source affine
and a copy of the source header, so a mask saved from napari overlays the CT in any other viewer
(ITK-SNAP, 3D Slicer, SimpleITK).  It never replaces an existing file unless asked to, and it
writes to a temporary file in the destination folder and renames it, so a crash never leaves a
half-written file behind.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic_file import atomic_path
from ..errors import InputError
from ..intensity import DISPLAY8
from .geometry import Geometry
from .output import OutputExistsError, prepare_output, refuse_if_appeared
from .volume import (  # noqa: F401  (re-exported: the names callers have always imported from here)
    KIND_IMAGE, KIND_LABELS, MAX_LABELS, NotHounsfieldError, RawVolume, Volume, check_same_grid, check_size,
    exact_values, finish_volume, image_domain, smallest_integer, squeeze_to_3d,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"

#: layer metadata key of the file a layer was read from (next to ``GEOMETRY_KEY``)
SOURCE_PATH_KEY = "covidseg_source_path"


def is_nifti_path(path) -> bool:
    """True if the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _one_line(exc: BaseException, with_type: bool = True) -> str:
    """An exception as one short line (nibabel messages may span lines and name temp paths)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if with_type else text


def _display_name(path) -> str:
    return Path(path).name


# --- loading ---------------------------------------------------------------------------------
def _open_image(path: Path):
    """nibabel image of ``path`` (header only), or an :class:`InputError` saying why not."""
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path and the file name.")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file: choose a .nii or .nii.gz file inside it.")
    if not is_nifti_path(path):
        raise InputError(
            f"{path.name} is not a NIfTI file name (.nii, .nii.gz): open other formats (DICOM, NRRD, MHA, "
            "PNG slices) through napari_covidseg.io.loader.load_any."
        )
    try:
        with open(path, "rb") as stream:
            is_gzip = stream.read(2) == GZIP_MAGIC
    except OSError as exc:
        raise InputError(f"{path} cannot be opened ({exc.strerror}): check its permissions.") from None
    named_gzip = path.name.lower().endswith(".gz")
    try:
        if is_gzip != named_gzip:
            img = _load_misnamed(path, is_gzip)
        else:
            img = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(
            f"{path.name} is not a valid gzip file ({_one_line(exc, with_type=False)}): it is probably truncated or corrupt. "
            "Download or copy it again."
        ) from None
    except Exception as exc:  # nibabel raises many types for a file that is not NIfTI
        raise InputError(
            f"{path.name} could not be read as NIfTI ({_one_line(exc)}). "
            "It may be truncated, corrupt, or another format renamed to .nii; "
            "check the file, or convert the original to NIfTI again."
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(
            f"{path.name} is a {type(img).__name__}, not a NIfTI image: convert it to NIfTI (.nii.gz)."
        )
    return img


def _load_misnamed(path: Path, is_gzip: bool):
    """A .nii that is gzip-compressed, or a .nii.gz that is not: read it from its bytes.

    Such files are common after a download tool decompressed (or not) without renaming; the
    content is a valid NIfTI, so it is read rather than refused.
    """
    data = path.read_bytes()
    if is_gzip:
        data = gzip.decompress(data)
    sizeof_hdr = {int.from_bytes(data[:4], order) for order in ("little", "big")} if len(data) >= 4 else set()
    image_class = nib.Nifti1Image if 348 in sizeof_hdr else nib.Nifti2Image if 540 in sizeof_hdr else None
    if image_class is None:
        raise nib.filebasedimages.ImageFileError(
            f"{'gzip-compressed data' if is_gzip else 'uncompressed data'} without a NIfTI header"
        )
    return image_class.from_bytes(data)


def _read_voxels(img, name: str) -> np.ndarray:
    """The file's voxels with scl_slope/scl_inter applied, in the smallest exact dtype.

    Integer data with integer scaling (the usual CT: int16 or uint16 with intercept -1024) stays
    integer and becomes int16 if every value fits; anything else becomes float32.
    """
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(
            f"{name} is truncated or corrupt ({_one_line(exc)}): its voxel data ends early. "
            "Download or copy the file again."
        ) from None
    except Exception as exc:
        raise InputError(
            f"The voxel data of {name} could not be read ({_one_line(exc)}): the file is "
            "probably truncated or corrupt. Download or copy it again."
        ) from None
    if raw.dtype.fields is not None or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        raise InputError(
            f"{name} stores {raw.dtype} voxels (e.g. RGB colour), not grey values: "
            "export the CT as a single-channel image in Hounsfield units."
        )
    raw = raw.reshape(raw.shape[:3])
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    if slope == 1 and inter == 0:
        return exact_values(raw, name)
    if np.issubdtype(raw.dtype, np.integer) and float(slope).is_integer() and float(inter).is_integer():
        # int32 holds any 8/16-bit value times a CT-sized slope; wider data needs int64
        small = raw.dtype.itemsize <= 2 and abs(slope) < 2**14 and abs(inter) < 2**30
        work = np.int32 if small else np.int64
        return smallest_integer(raw.astype(work) * work(slope) + work(inter))
    # float32 arithmetic: HU need ~5 significant digits, and it halves the memory of float64
    return exact_values(raw.astype(np.float32) * np.float32(slope) + np.float32(inter), name)


def placeholder_spacing(img, domain: str) -> bool:
    """True when the file's voxel size is not a measurement: exactly 1 mm along every axis in an
    8-bit display image (what PNG/JPG-to-NIfTI converters write) or in a file without spatial units."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spatial_unit = img.header.get_xyzt_units()[0]
    return all(z == 1.0 for z in zooms) and (domain == DISPLAY8 or spatial_unit == "unknown")


def read_nifti(path) -> RawVolume:
    """The voxels (scaling applied) and geometry of a 3D NIfTI file, before the shared checks.

    Guarantees: the file is a readable NIfTI-1/2 (also when its gzip compression and its name
    disagree), 3D (trailing singleton axes dropped), not larger than memory, with finite values;
    the geometry is the file's best affine (sform, else qform) and a copy of its header.
    """
    path = Path(path).expanduser()
    name = _display_name(path)
    img = _open_image(path)
    shape = squeeze_to_3d(img.shape, name)
    check_size(shape, img.get_data_dtype().itemsize, name)
    values = _read_voxels(img, name)
    geometry = Geometry.from_nifti(img, source_path=str(path.resolve()))
    geometry.file_shape = tuple(int(s) for s in img.shape[:3])
    unit_spacing = all(float(z) == 1.0 for z in img.header.get_zooms()[:3])
    return RawVolume(values=values, geometry=geometry, name=name, source_format="nifti",
                     spacing_known=not placeholder_spacing(img, "unknown"), unit_spacing=unit_spacing)


def load_volume(path, kind: str = "auto", check_hounsfield: bool = True) -> Volume:
    """Read a 3D NIfTI CT or mask into a display-ordered :class:`Volume`.

    ``kind`` is ``"auto"`` (a mask if the values are few non-negative integers, else a CT),
    ``"image"`` or ``"labels"`` to insist on one.  An image is in HU or an 8-bit display image
    (``Volume.domain``); ``check_hounsfield=False`` also accepts images that are neither (0..1 data,
    a constant image; only for callers that rescale it themselves).
    Raises :class:`InputError` with a message for the user for anything that cannot be used.
    Other formats are read by :func:`napari_covidseg.io.loader.load_any`, which calls this for NIfTI.
    """
    if kind not in ("auto", KIND_IMAGE, KIND_LABELS):
        raise ValueError(f"kind must be 'auto', 'image' or 'labels', not {kind!r}")
    return finish_volume(read_nifti(path), kind=kind, check_hounsfield=check_hounsfield)


# --- saving ----------------------------------------------------------------------------------
def _build_image(file_array: np.ndarray, geometry: Geometry):
    header = geometry.header
    if header is None:
        img = nib.Nifti1Image(file_array, geometry.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_sform(geometry.affine, code="aligned")
        img.header.set_qform(geometry.affine, code="scanner")
    else:
        header = header.copy()
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        if np.allclose(header.get_best_affine(), geometry.affine, atol=1e-6):
            # same affine: keep the header's sform and qform exactly as they were
            img = image_class(file_array, None, header=header)
        else:
            img = image_class(file_array, geometry.affine, header=header)
            img.header.set_sform(geometry.affine, code=sform_code or "aligned")
            img.header.set_qform(geometry.affine, code=qform_code or "unknown")
    hdr = img.header
    hdr.set_data_dtype(file_array.dtype)
    hdr.set_slope_inter(1.0, 0.0)  # values are stored verbatim (a mask label 2 stays 2)
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    return img


def save_volume(path, display_array, geometry: Geometry, overwrite: bool = False) -> Path:
    """Write a display-ordered (z, y, x) array as NIfTI in ``geometry``'s file orientation.

    The voxels are put back in the source file's axis order with its affine and a copy of its
    header (sform/qform codes kept, dtype set to the array's, scaling reset so mask labels are
    stored as is).  An existing ``path`` raises :class:`OutputExistsError` unless
    ``overwrite=True``.  The file appears atomically: written under a temporary name in the same
    folder, then renamed.  Returns the path written.
    """
    path = Path(path).expanduser()
    if not is_nifti_path(path):
        raise InputError(f"{path.name}: NIfTI files must end in .nii or .nii.gz; choose such a name.")
    path, file_array = prepare_output(path, display_array, geometry, overwrite, "NIfTI")
    img = _build_image(file_array, geometry)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=f".part{suffix}", before_replace=refuse_if_appeared(path, overwrite)) as tmp:
        nib.save(img, str(tmp))
    return path
