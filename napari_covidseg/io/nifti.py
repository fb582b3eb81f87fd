"""Load and save chest CT and masks as NIfTI without losing or moving a voxel.

``load_volume`` turns a ``.nii`` / ``.nii.gz`` file into a display-ordered (z, y, x) array plus
the :class:`~napari_covidseg.io.geometry.Geometry` needed to put it back, and decides whether it
is a CT (``kind="image"``) or a mask (``kind="labels"``).  A CT is in one of two intensity domains
(:mod:`napari_covidseg.intensity`): Hounsfield units, or an 8-bit display image (0..255, e.g. a
PNG/JPG release converted to NIfTI); ``Volume.domain`` says which, and ``Volume.spacing_known``
says whether the voxel size is a measurement or the 1 mm placeholder such conversions write.  Everything a user can
get wrong (a truncated download, a PNG stack converted to NIfTI, a 4D series, a normalised image)
is caught here and reported as an :class:`~napari_covidseg.errors.InputError` whose message says
what is wrong and what to do, so the GUI and the CLI never show a traceback.

``save_volume`` writes a display array back in the *file's own* voxel order with the source affine
and a copy of the source header, so a mask saved from napari overlays the CT in any other viewer
(ITK-SNAP, 3D Slicer, SimpleITK).  It never replaces an existing file unless asked to, and it
writes to a temporary file in the destination folder and renames it, so a crash never leaves a
half-written file behind.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import nibabel as nib
import numpy as np

from ..atomic_file import atomic_path
from ..errors import InputError
from ..intensity import DISPLAY8, HU, looks_like_display8
from .geometry import Geometry

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"

#: A file whose values are non-negative integers with at most this many distinct values is a mask.
MAX_LABELS = 32

KIND_IMAGE = "image"
KIND_LABELS = "labels"

#: layer metadata key of the file a layer was read from (next to ``GEOMETRY_KEY``)
SOURCE_PATH_KEY = "covidseg_source_path"


class OutputExistsError(InputError, FileExistsError):
    """The destination file exists and overwriting was not asked for."""


@dataclass
class Volume:
    """A volume read from disk, ready for napari.

    ``data`` is display-ordered (z, y, x); ``geometry`` puts it back into the file's voxel order
    and world space; ``kind`` is ``"image"`` (a CT: in HU as float32, or int16 when exact; or an
    8-bit display image as uint8) or ``"labels"`` (a mask: uint8 or uint16).  ``domain`` is
    ``"hu"`` or ``"display8"`` for images; ``spacing_known`` is False where the file's voxel size is
    a placeholder (1 mm everywhere in an 8-bit image or a file without units), so no mm or mL may be
    derived from it.
    """

    data: np.ndarray
    geometry: Geometry
    kind: str
    domain: str = HU
    spacing_known: bool = True

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along (z, y, x): napari's ``scale``."""
        return self.geometry.spacing

    @property
    def source_path(self) -> Optional[str]:
        return self.geometry.source_path


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
            f"{path.name} is not a NIfTI file name: covidseg reads .nii and .nii.gz files. "
            "Convert DICOM series or other formats to NIfTI first (e.g. with dcm2niix)."
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


def _squeeze_to_3d(shape, name: str) -> Tuple[int, int, int]:
    """The 3D shape of a volume, or an :class:`InputError` for 2D and multi-volume files."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise InputError(
            f"{name} holds a {len(shape)}D image of shape {shape}, not a 3D CT volume: "
            "open the whole CT series (all slices in one 3D NIfTI file)."
        )
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise InputError(
            f"{name} has shape {shape}: it is a time series / multi-volume (4D) file with "
            f"{int(np.prod(extra))} volumes. covidseg needs one 3D CT: split the series and open "
            "one volume (e.g. with fslsplit or nibabel's image slicing)."
        )
    if any(s < 1 for s in shape[:3]):
        raise InputError(f"{name} has an empty shape {shape}: the file holds no voxels.")
    return shape[:3]


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
    if np.issubdtype(raw.dtype, np.integer) and float(slope).is_integer() and float(inter).is_integer():
        if slope == 1 and inter == 0:
            values = raw
        else:
            # int32 holds any 8/16-bit value times a CT-sized slope; wider data needs int64
            small = raw.dtype.itemsize <= 2 and abs(slope) < 2**14 and abs(inter) < 2**30
            work = np.int32 if small else np.int64
            values = raw.astype(work) * work(slope) + work(inter)
        return _smallest_integer(values)
    # float32 arithmetic: HU need ~5 significant digits, and it halves the memory of float64
    values = raw.astype(np.float32) * np.float32(slope) + np.float32(inter) if (slope != 1 or inter != 0) else raw
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        what = "all voxels are" if n_bad == values.size else f"{n_bad} of {values.size} voxels are"
        raise InputError(
            f"{name} contains non-finite values: {what} NaN or infinite. A CT has a finite value "
            "in every voxel; re-export it without masking/NaN padding (use -1024 HU for outside the scan)."
        )
    if values.size and np.array_equal(values, np.round(values)):
        lo, hi = float(values.min()), float(values.max())
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):  # cast once, straight to the fit
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32, copy=False)


def _smallest_integer(values: np.ndarray) -> np.ndarray:
    """int16 if it fits (CT), otherwise int32/float32; non-negative data keeps unsigned types."""
    if values.size == 0:
        return values.astype(np.int16)
    lo, hi = int(values.min()), int(values.max())
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return values.astype(dtype, copy=False)
    return values.astype(np.float32)


def _image_dtype(values: np.ndarray) -> np.ndarray:
    """CT voxels as int16 when every value fits exactly, else float32."""
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(np.int16)
        if values.size == 0 or (info.min <= int(values.min()) and int(values.max()) <= info.max):
            return values.astype(np.int16, copy=False)
    return values.astype(np.float32, copy=False)


def _looks_like_labels(values: np.ndarray) -> bool:
    if not np.issubdtype(values.dtype, np.integer) or values.size == 0:
        return False
    if int(values.min()) < 0 or int(values.max()) > np.iinfo(np.uint16).max:
        return False
    # quick reject before the full unique: a CT has far more than MAX_LABELS values
    sample = values.reshape(-1)[:: max(1, values.size // 200_000)]
    if np.unique(sample).size > MAX_LABELS:
        return False
    return np.unique(values).size <= MAX_LABELS


class NotHounsfieldError(InputError):
    """The image holds normalised intensities (0..1), neither Hounsfield units nor 8-bit display values."""


def image_domain(values: np.ndarray, name: str) -> str:
    """``"hu"`` or ``"display8"`` for a CT's values; refuses images that are neither (with a way out)."""
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise InputError(
            f"{name} has the same value ({lo:g}) in every voxel: it holds no image. "
            "Check that the right file was exported."
        )
    if lo >= 0.0 and hi <= 1.0:
        raise NotHounsfieldError(
            f"{name} has all values in [0, 1] (range {lo:g}..{hi:g}): it looks like a normalised "
            "image, not Hounsfield units. covidseg needs the CT in HU (air about -1000, water 0): "
            "export the CT in HU (e.g. convert the original DICOM with dcm2niix), or as 8-bit 0..255."
        )
    return DISPLAY8 if looks_like_display8(values) else HU


def placeholder_spacing(img, domain: str) -> bool:
    """True when the file's voxel size is not a measurement: exactly 1 mm along every axis in an
    8-bit display image (what PNG/JPG-to-NIfTI converters write) or in a file without spatial units."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spatial_unit = img.header.get_xyzt_units()[0]
    return all(z == 1.0 for z in zooms) and (domain == DISPLAY8 or spatial_unit == "unknown")


def load_volume(path, kind: str = "auto", check_hounsfield: bool = True) -> Volume:
    """Read a 3D NIfTI CT or mask into a display-ordered :class:`Volume`.

    ``kind`` is ``"auto"`` (a mask if the values are few non-negative integers, else a CT),
    ``"image"`` or ``"labels"`` to insist on one.  An image is in HU or an 8-bit display image
    (``Volume.domain``); ``check_hounsfield=False`` also accepts images that are neither (0..1 data,
    a constant image; only for callers that rescale it themselves).
    Raises :class:`InputError` with a message for the user for anything that cannot be used.
    """
    if kind not in ("auto", KIND_IMAGE, KIND_LABELS):
        raise ValueError(f"kind must be 'auto', 'image' or 'labels', not {kind!r}")
    path = Path(path).expanduser()
    name = _display_name(path)
    img = _open_image(path)
    _squeeze_to_3d(img.shape, name)
    values = _read_voxels(img, name)
    is_labels = _looks_like_labels(values)
    if kind == KIND_LABELS and not is_labels:
        raise InputError(
            f"{name} is not a mask: masks hold a few (at most {MAX_LABELS}) non-negative integer "
            f"labels, this file holds values {float(values.min()):g}..{float(values.max()):g}. "
            "Choose the mask file, not the CT."
        )
    if kind == "auto":
        kind = KIND_LABELS if is_labels else KIND_IMAGE
    domain = HU
    if kind == KIND_LABELS:
        values = values.astype(np.uint8 if int(values.max()) <= 255 else np.uint16, copy=False)
    else:
        if check_hounsfield:
            domain = image_domain(values, name)
        elif looks_like_display8(values):
            domain = DISPLAY8
        values = values.astype(np.uint8) if domain == DISPLAY8 else _image_dtype(values)
    geometry = Geometry.from_nifti(img, source_path=str(path.resolve()))
    geometry.file_shape = tuple(int(s) for s in img.shape[:3])
    display = np.ascontiguousarray(geometry.to_display(values))
    return Volume(data=display, geometry=geometry, kind=kind, domain=domain,
                  spacing_known=not placeholder_spacing(img, domain))


def check_same_grid(mask: Volume, ct: Volume, what: str = "mask") -> None:
    """Raise :class:`InputError` unless ``mask`` lies voxel-for-voxel on ``ct``'s grid."""
    mask_name = Path(mask.source_path).name if mask.source_path else f"the {what}"
    ct_name = Path(ct.source_path).name if ct.source_path else "the CT"
    if tuple(mask.data.shape) != tuple(ct.data.shape):
        raise InputError(
            f"The {what} {mask_name} has shape {tuple(mask.data.shape)} (z, y, x) but the CT {ct_name} "
            f"has shape {tuple(ct.data.shape)}: they do not belong together. Choose the {what} made "
            "from this CT (or resample it onto the CT's grid first)."
        )
    if not np.allclose(mask.geometry.affine, ct.geometry.affine, atol=1e-3):
        raise InputError(
            f"The {what} {mask_name} has the CT's shape but another position/orientation (affine) than "
            f"{ct_name}: it would not overlay the CT. Choose the {what} made from this CT."
        )


# --- saving ----------------------------------------------------------------------------------
def _storage_array(display_array: np.ndarray) -> np.ndarray:
    """The array in a dtype every NIfTI reader understands (bool and 64-bit types narrowed)."""
    arr = np.asarray(display_array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64, np.int32, np.uint32) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return arr.astype(dtype)
        raise InputError(f"Values {lo}..{hi} do not fit a 32-bit integer NIfTI file.")
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise InputError(f"Cannot save an array of type {arr.dtype} as NIfTI: convert it to numbers first.")
    return arr


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
    if path.is_dir():
        raise InputError(f"{path} is a folder: choose a file name ending in .nii.gz.")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and was not overwritten: choose another file name "
            "(or confirm overwriting it)."
        )
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"The folder {folder} does not exist: create it or choose another folder.")
    arr = _storage_array(display_array)
    if arr.ndim != 3:
        raise InputError(f"Only 3D volumes can be saved; this array has shape {arr.shape}.")
    if tuple(arr.shape) != tuple(geometry.display_shape):
        raise InputError(
            f"The array has shape {tuple(arr.shape)} (z, y, x) but the CT geometry has shape "
            f"{tuple(geometry.display_shape)}: save it with the geometry of the CT it was made from."
        )
    file_array = np.ascontiguousarray(geometry.from_display(arr))
    img = _build_image(file_array, geometry)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"

    def refuse_if_it_appeared():
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"{path} appeared while saving and was not overwritten: choose another name.")

    with atomic_path(path, suffix=f".part{suffix}", before_replace=refuse_if_it_appeared) as tmp:
        nib.save(img, str(tmp))
    return path
