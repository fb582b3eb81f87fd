"""The one thing every format reader returns, and the checks every format shares.

A format reader (:mod:`.nifti`, :mod:`.itk`, :mod:`.dicom`, :mod:`.slices`) turns a file, a folder
or an archive into a :class:`RawVolume`: the voxels in the file's own axis order with physical
values (rescale applied), the :class:`~napari_covidseg.io.geometry.Geometry` that places them in
the patient, and what the reader knows about the spacing and the intensity domain.
:func:`finish_volume` then applies, once for all formats, what makes it a :class:`Volume`: finite
non-singular geometry, mask or CT, the intensity domain (Hounsfield units or an 8-bit display
image), the smallest exact dtype and the display order (z, y, x).

:func:`check_size` is the one check that must run *before* a reader allocates the voxels, so each
reader calls it with the shape it read from the header.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..intensity import DISPLAY8, HU, looks_like_display8
from .geometry import Geometry

KIND_IMAGE = "image"
KIND_LABELS = "labels"
KINDS = ("auto", KIND_IMAGE, KIND_LABELS)

#: A file whose values are non-negative integers with at most this many distinct values is a mask.
MAX_LABELS = 32

#: working copies a reader may hold at once (raw, rescaled, display-ordered)
_WORKING_COPIES = 3


@dataclass
class Volume:
    """A volume read from disk, ready for napari.

    ``data`` is display-ordered (z, y, x); ``geometry`` puts it back into the file's voxel order
    and world space; ``kind`` is ``"image"`` (a CT: in HU as float32, or int16 when exact; or an
    8-bit display image as uint8) or ``"labels"`` (a mask: uint8 or uint16).  ``domain`` is
    ``"hu"`` or ``"display8"`` for images; ``spacing_known`` is False where the file's voxel size is
    a placeholder (1 mm everywhere in an 8-bit image or a file without units), so no mm or mL may be
    derived from it.  ``source_format`` names the reader (``"nifti"``, ``"nrrd"``, ``"metaimage"``,
    ``"dicom"``, ``"slices"``); ``description`` says which part of the source it is (a DICOM
    series' number and description); ``notes`` are facts the user should be told (gantry tilt,
    ignored duplicate slices, gaps in a numbered slice series).
    """

    data: np.ndarray
    geometry: Geometry
    kind: str
    domain: str = HU
    spacing_known: bool = True
    source_format: str = "nifti"
    description: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along (z, y, x): napari's ``scale``."""
        return self.geometry.spacing

    @property
    def source_path(self) -> Optional[str]:
        return self.geometry.source_path


@dataclass
class RawVolume:
    """What a format reader hands to :func:`finish_volume`.

    ``values`` are in the file's axis order (``geometry.file_shape``) with physical values.
    ``spacing_known`` is False where the format has no real voxel size (PNG slices, a NIfTI of
    1 mm without units); ``unit_spacing`` is True where every voxel size is exactly 1 (a
    placeholder when the image turns out to be 8-bit).  ``domain`` is set where the format says it
    (DICOM CT is HU by definition) and None where the values decide; ``kind`` likewise.
    """

    values: np.ndarray
    geometry: Geometry
    name: str
    source_format: str
    spacing_known: bool = True
    unit_spacing: bool = False
    domain: Optional[str] = None
    kind: str = "auto"
    description: str = ""
    notes: List[str] = field(default_factory=list)
    stored_dtype: str = ""  # the file's own voxel type (numpy name), where the format has one


# --- before reading -------------------------------------------------------------------------
#: deflate (gzip, zlib) never expands data more than this: a 258-byte match costs at least 2 bits
MAX_DEFLATE_RATIO = 1032


def is_regular_file(path) -> bool:
    """True for a regular file (or a link to one); False for folders, pipes, devices, sockets, nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def require_regular_file(path, what: str = "file") -> Path:
    """``path`` if it is a regular file, else an :class:`InputError` that says what it is instead.

    Reading a pipe (FIFO), a device or a socket can block forever or never end, so nothing else is opened.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: check the path and the file name.") from None
    except OSError as exc:
        raise InputError(f"{path} cannot be opened ({exc.strerror}): check its permissions.") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a folder, not a {what}.")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise InputError(f"{path.name} is {kind}, not a regular {what}: covidseg reads only regular files "
                         "(copy the data into a file first).")
    return path


def _physical_memory() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # not available on this platform
        return None


def available_memory() -> Optional[int]:
    """Memory a new allocation can get now (Linux ``MemAvailable``), else the physical memory."""
    try:
        with open("/proc/meminfo", "rb") as stream:
            for line in stream:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _physical_memory()


def _shape_text(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_size(shape: Sequence[int], itemsize: int, name: str, stored: Optional[int] = None,
               encoding: str = "raw") -> None:
    """Refuse, before any allocation, a volume its file cannot hold or this machine cannot read.

    ``stored`` is the number of bytes the file has for the voxels (after the header), ``encoding``
    ``"raw"`` (they must all be there), ``"deflate"`` (gzip/zlib: at most :data:`MAX_DEFLATE_RATIO`
    times more once unpacked) or ``"other"`` (no bound from the file).  The memory needed is
    compared with the memory available now.
    """
    voxels = int(np.prod([int(s) for s in shape], dtype=np.float64))
    data_bytes = voxels * int(itemsize)
    if stored is not None and encoding == "raw" and data_bytes > stored:
        raise InputError(
            f"{name} is truncated: its header declares {_shape_text(shape)} voxels ({data_bytes:,} bytes) but the "
            f"file holds only {max(0, stored):,} bytes of voxel data. Download or copy it again."
        )
    if stored is not None and encoding == "deflate" and data_bytes > (stored + 64) * MAX_DEFLATE_RATIO:
        raise InputError(
            f"{name} declares {_shape_text(shape)} voxels ({data_bytes / 2**20:,.1f} MiB) but its compressed data "
            f"({stored:,} bytes) cannot unpack to more than {(stored + 64) * MAX_DEFLATE_RATIO / 2**20:,.1f} MiB: "
            "the header is corrupt or the file truncated. Download or copy it again."
        )
    need = voxels * max(int(itemsize), 4) * _WORKING_COPIES
    memory = available_memory()
    if memory is not None and need > memory:
        raise InputError(
            f"{name} declares {_shape_text(shape)} voxels: reading it would need about "
            f"{need / 2**30:.1f} GiB and this machine has {memory / 2**30:.1f} GiB available. Check that the file is "
            "not corrupt, or crop/downsample the volume on a larger machine first."
        )


def squeeze_to_3d(shape, name: str) -> Tuple[int, int, int]:
    """The 3D shape of a volume (trailing singleton axes dropped), or an :class:`InputError` for
    2D and multi-volume images."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise InputError(
            f"{name} holds a {len(shape)}D image of shape {shape}, not a 3D CT volume: "
            "open the whole CT series (all slices in one 3D file, or the folder of slices)."
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


def check_geometry(geometry: Geometry, name: str) -> None:
    """Refuse a position/orientation that is not finite, collapses an axis or has no orientation."""
    affine = geometry.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(
            f"The position/orientation (affine) of {name} holds NaN or infinite values: the file's "
            "geometry is corrupt. Re-export the image from its original (e.g. the DICOM series)."
        )
    matrix = affine[:3, :3]
    with np.errstate(all="ignore"):
        det = float(np.linalg.det(matrix))
        sizes = np.sqrt((matrix ** 2).sum(axis=0))
        # |det| over the product of the axis lengths: 1 for perpendicular axes, 0 when two coincide
        skew = abs(det) / float(np.prod(sizes)) if np.all(sizes > 0) and np.isfinite(np.prod(sizes)) else 0.0
    if not np.isfinite(det) or abs(det) < 1e-12 or not skew > 1e-6:
        raise InputError(
            f"The position/orientation (affine) of {name} is singular (a voxel size of 0 or two axes in the "
            "same direction): the file's geometry is corrupt. Re-export the image from its original."
        )
    try:
        geometry.display_shape  # the orientation the display order is derived from
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise InputError(
            f"The position/orientation (affine) of {name} has no usable orientation ({exc}): the file's "
            "geometry is corrupt. Re-export the image from its original."
        ) from None


#: voxel sizes (mm) outside this range are no CT's: probably a unit or header error
PLAUSIBLE_VOXEL_MM = (0.01, 100.0)


def geometry_notes(geometry: Geometry) -> List[str]:
    """Warnings about a geometry that is valid but implausible for a CT (e.g. metres read as mm)."""
    low, high = PLAUSIBLE_VOXEL_MM
    spacing = geometry.spacing
    if all(low <= s <= high for s in spacing):
        return []
    shown = " x ".join(f"{s:g}" for s in spacing)
    return [f"the voxel size {shown} mm (z, y, x) is implausible for a CT (expected {low:g}..{high:g} mm): the "
            "file's units or geometry are probably wrong, so distances and volumes will be too."]


# --- values ---------------------------------------------------------------------------------
def smallest_integer(values: np.ndarray) -> np.ndarray:
    """int16 if it fits (CT), otherwise int32/float32; non-negative data keeps unsigned types."""
    if values.size == 0:
        return values.astype(np.int16)
    lo, hi = int(values.min()), int(values.max())
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return values.astype(dtype, copy=False)
    return values.astype(np.float32)


def exact_values(values: np.ndarray, name: str) -> np.ndarray:
    """Physical voxel values in the smallest dtype that holds them exactly.

    Integers stay integer; float data that holds only whole numbers becomes integer too; other
    float data becomes float32.  Non-finite values are refused: a CT has a value in every voxel.
    """
    values = np.asarray(values)
    if values.dtype == bool:
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        return smallest_integer(values)
    if not np.all(np.isfinite(values)):
        n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        what = "all voxels are" if n_bad == values.size else f"{n_bad} of {values.size} voxels are"
        raise InputError(
            f"{name} contains non-finite values: {what} NaN or infinite. A CT has a finite value "
            "in every voxel; re-export it without masking/NaN padding (use -1024 HU for outside the scan)."
        )
    if values.size and values.dtype.itemsize > 4 and float(np.abs(values).max()) > float(np.finfo(np.float32).max):
        raise InputError(
            f"{name} holds values up to {float(np.abs(values).max()):.3g}, beyond what covidseg computes with "
            "(float32, about 3.4e38): the file is corrupt or not an image. Re-export the CT in HU."
        )
    if values.size and np.array_equal(values, np.round(values)):
        lo, hi = float(values.min()), float(values.max())
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):  # cast once, straight to the fit
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32, copy=False)


def image_dtype(values: np.ndarray) -> np.ndarray:
    """CT voxels as int16 when every value fits exactly, else float32."""
    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(np.int16)
        if values.size == 0 or (info.min <= int(values.min()) and int(values.max()) <= info.max):
            return values.astype(np.int16, copy=False)
    return values.astype(np.float32, copy=False)


def looks_like_labels(values: np.ndarray) -> bool:
    """Few (at most :data:`MAX_LABELS`) non-negative integer values: a mask."""
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


def image_domain(values: np.ndarray, name: str, known: Optional[str] = None) -> str:
    """``"hu"`` or ``"display8"`` for a CT's values; refuses images that are neither (with a way out).

    ``known`` is the domain the format states (DICOM CT: HU); the values then only have to hold an image.
    """
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise InputError(
            f"{name} has the same value ({lo:g}) in every voxel: it holds no image. "
            "Check that the right file was exported."
        )
    if known is not None:
        return known
    if lo >= 0.0 and hi <= 1.0:
        raise NotHounsfieldError(
            f"{name} has all values in [0, 1] (range {lo:g}..{hi:g}): it looks like a normalised "
            "image, not Hounsfield units. covidseg needs the CT in HU (air about -1000, water 0): "
            "export the CT in HU (e.g. convert the original DICOM with dcm2niix), or as 8-bit 0..255."
        )
    return DISPLAY8 if looks_like_display8(values) else HU


# --- after reading --------------------------------------------------------------------------
def _decide_kind(values: np.ndarray, kind: str, name: str) -> str:
    is_labels = looks_like_labels(values)
    if kind == KIND_LABELS and not is_labels:
        raise InputError(
            f"{name} is not a mask: masks hold a few (at most {MAX_LABELS}) non-negative integer "
            f"labels, this file holds values {float(values.min()):g}..{float(values.max()):g}. "
            "Choose the mask file, not the CT."
        )
    if kind == "auto":
        return KIND_LABELS if is_labels else KIND_IMAGE
    return kind


def contiguous_in_place(view: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(view)``, written into ``view``'s own memory where ``view`` only flips
    axes of a C-contiguous writeable 3D buffer (a CT stored x-fastest whose display order flips x
    and y, the usual case): no second copy of the volume, one slice of temporary memory.  The
    buffer's former contents are overwritten, so ``view`` must be the only use of it."""
    flipped = tuple(axis for axis, stride in enumerate(view.strides) if stride < 0)
    base = np.flip(view, flipped) if flipped else view
    if not flipped or view.ndim != 3 or not (base.flags.c_contiguous and base.flags.writeable):
        return np.ascontiguousarray(view)
    inner, n = tuple(axis - 1 for axis in flipped if axis > 0), base.shape[0]
    for i in range((n + 1) // 2 if 0 in flipped else n):  # one pass: slice i and its mirror j, each flipped in-plane
        j = n - 1 - i if 0 in flipped else i
        first = np.flip(base[i], inner).copy()
        if j != i:
            base[i] = np.flip(base[j], inner)
        base[j] = first
    return base


def finish_volume(raw: RawVolume, kind: str = "auto", check_hounsfield: bool = True) -> Volume:
    """The :class:`Volume` of a reader's :class:`RawVolume`: the checks every format shares.

    ``kind`` is ``"auto"`` (the reader's ``raw.kind``, else a mask if the values are few
    non-negative integers, else a CT), ``"image"`` or ``"labels"`` to insist on one.  An image is
    in HU or an 8-bit display image; ``check_hounsfield=False`` also accepts images that are
    neither (0..1 data, a constant image; only for callers that rescale it themselves).
    Raises :class:`InputError` with a message for the user for anything that cannot be used.
    ``raw.values`` is the reader's own array: it may be reordered in place into the volume's data
    (:func:`contiguous_in_place`), so it is not used afterwards.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto', 'image' or 'labels', not {kind!r}")
    check_geometry(raw.geometry, raw.name)
    values = raw.values
    if tuple(values.shape) != tuple(raw.geometry.file_shape):
        raise ValueError(f"reader bug: values {values.shape} vs geometry {raw.geometry.file_shape}")
    kind = _decide_kind(values, raw.kind if kind == "auto" else kind, raw.name)
    domain = HU
    if kind == KIND_LABELS:
        values = values.astype(np.uint8 if int(values.max()) <= 255 else np.uint16, copy=False)
    else:
        if check_hounsfield:
            domain = image_domain(values, raw.name, known=raw.domain)
        elif raw.domain is not None:
            domain = raw.domain
        elif looks_like_display8(values):
            domain = DISPLAY8
        values = values.astype(np.uint8) if domain == DISPLAY8 else image_dtype(values)
    display = contiguous_in_place(raw.geometry.to_display(values))
    spacing_known = raw.spacing_known and not (domain == DISPLAY8 and raw.unit_spacing)
    notes = list(raw.notes) + (geometry_notes(raw.geometry) if spacing_known else [])
    if kind == KIND_IMAGE and domain == HU:
        notes += hounsfield_notes(values, raw.stored_dtype)
    return Volume(data=display, geometry=raw.geometry, kind=kind, domain=domain, spacing_known=spacing_known,
                  source_format=raw.source_format, description=raw.description, notes=notes)


def hounsfield_notes(values: np.ndarray, stored_dtype: str = "") -> List[str]:
    """Warnings about a CT that is read as HU but probably is not (what the Segment widget also warns about)."""
    notes = []
    if stored_dtype == "int8":
        notes.append("the voxels are stored as int8 (-128..127), which cannot hold a CT in HU (air is about -1000): "
                     "the file was probably converted with a loss; segmentations of it will be poor.")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi > 1000:
        notes.append(f"the image has no negative values (min {lo:g}, max {hi:g}): it is probably stored without "
                     "the rescale intercept (HU = value - 1024), so it is not in HU and segmentations of it will be poor.")
    return notes


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
