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
from contextlib import contextmanager
from pathlib import Path
from typing import List, Tuple

import nibabel as nib
import numpy as np

from ..atomic_file import atomic_path
from ..errors import InputError
from ..intensity import DISPLAY8
from .geometry import Geometry
from .output import OutputExistsError, prepare_output, refuse_if_appeared
from .volume import (  # noqa: F401  (re-exported: the names callers have always imported from here)
    KIND_IMAGE, KIND_LABELS, MAX_LABELS, NotHounsfieldError, RawVolume, Volume, check_same_grid, check_size,
    exact_values, finish_volume, image_domain, require_regular_file, smallest_integer, squeeze_to_3d,
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
_CORRUPT_GZIP = (gzip.BadGzipFile, zlib.error, EOFError)
#: NIfTI xform codes (0 unknown .. 4 MNI; 5 template, NIfTI 2019)
_XFORM_CODES = range(0, 6)
#: spatial unit code (``xyzt_units & 7``) -> factor to mm
_UNIT_TO_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
_UNIT_NAMES = {1: "metres", 3: "microns"}


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path and the file name.")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file: choose a .nii or .nii.gz file inside it.")
    if not is_nifti_path(path):
        raise InputError(
            f"{path} is not a NIfTI file name (.nii, .nii.gz): open other formats (DICOM, NRRD, MHA, "
            "PNG slices) through napari_covidseg.io.loader.load_any."
        )
    require_regular_file(path, "NIfTI file")


@contextmanager
def _nifti_stream(path: Path):
    """The file's bytes as one stream: unpacked while read when it is gzip (whatever its name says,
    as download tools often decompress without renaming), else the file itself; yields (stream, gzipped)."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path} cannot be opened ({exc.strerror}): check its permissions.") from None
    with raw:
        is_gzip = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        if not is_gzip:
            yield raw, False
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
            yield unpacked, True


def _corrupt_gzip(name: str, exc: BaseException) -> InputError:
    return InputError(
        f"{name} is not a valid gzip file ({_one_line(exc, with_type=False)}): it is probably truncated or corrupt. "
        "Download or copy it again."
    )


def _image_class(stream, name: str):
    """Nifti1Image or Nifti2Image by the header size at the start of ``stream`` (either byte order)."""
    try:
        head = stream.read(4)
        stream.seek(0)
    except _CORRUPT_GZIP as exc:
        raise _corrupt_gzip(name, exc) from None
    sizes = {int.from_bytes(head, order) for order in ("little", "big")} if len(head) == 4 else set()
    if 348 in sizes:
        return nib.Nifti1Image
    if 540 in sizes:
        return nib.Nifti2Image
    raise InputError(
        f"{name} could not be read as NIfTI (it does not start with a NIfTI-1 or NIfTI-2 header). "
        "It may be truncated, corrupt, or another format renamed to .nii; check the file, or convert the original "
        "to NIfTI again."
    )


def _read_header(stream, image_class, name: str):
    """The header exactly as stored (nibabel's silent fixes not applied), then the stream rewound."""
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            header = image_class.header_class.from_fileobj(stream, check=False)
        stream.seek(0)
    except _CORRUPT_GZIP as exc:
        raise _corrupt_gzip(name, exc) from None
    except Exception as exc:  # nibabel raises many types for a header that is not NIfTI
        raise InputError(
            f"{name} could not be read as NIfTI ({_one_line(exc)}). It may be truncated, corrupt, or another format "
            "renamed to .nii; check the file, or convert the original to NIfTI again."
        ) from None
    return header


def _check_header(header, name: str) -> None:
    """Refuse what nibabel would silently 'fix' in a way that moves or rescales the image."""
    for key in ("sform_code", "qform_code"):
        if int(header[key]) not in _XFORM_CODES:
            raise InputError(f"{name}: its header's {key} is {int(header[key])}, which is no NIfTI code: the header "
                             "is corrupt. Re-export the image from its original (e.g. the DICOM series).")
    offset = float(header["vox_offset"])
    if not np.isfinite(offset) or offset < int(header["sizeof_hdr"]) + 4:
        raise InputError(f"{name}: its header says the voxels start at byte {offset:g}, inside the header: the "
                         "header is corrupt. Download or copy the file again.")
    if int(header["sform_code"]) > 0:
        return  # the geometry is the sform's (checked with every format's geometry)
    pixdim = np.asarray(header["pixdim"], dtype=np.float64)
    for axis in range(1, 4):
        if not (np.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise InputError(
                f"{name}: the voxel size in its header is {pixdim[axis]:g} along axis {axis} (pixdim[{axis}]); it must "
                "be a positive number: the geometry is corrupt. Re-export the image from its original."
            )
    quatern = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
    if int(header["qform_code"]) > 0 and (not np.all(np.isfinite(quatern)) or sum(q * q for q in quatern) > 1 + 1e-6):
        raise InputError(f"{name}: the orientation in its header (qform quaternion {quatern}) is not a rotation: the "
                         "geometry is corrupt. Re-export the image from its original.")


def _open_image(stream, name: str):
    """nibabel image of the open ``stream`` (header read and checked, voxels not yet), or an InputError."""
    image_class = _image_class(stream, name)
    _check_header(_read_header(stream, image_class, name), name)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # the header was checked above, in our words
            holder = nib.fileholders.FileHolder(fileobj=stream)
            return image_class.from_file_map({"image": holder, "header": holder}, mmap=False, keep_file_open=False)
    except _CORRUPT_GZIP as exc:
        raise _corrupt_gzip(name, exc) from None
    except Exception as exc:
        raise InputError(
            f"{name} could not be read as NIfTI ({_one_line(exc)}). It may be truncated, corrupt, or another format "
            "renamed to .nii; check the file, or convert the original to NIfTI again."
        ) from None


def _read_to_end(stream, name: str) -> None:
    """Unpack the rest of a gzip stream, so its CRC-32 and length are checked (corruption is refused)."""
    try:
        while stream.read(1 << 20):
            pass
    except _CORRUPT_GZIP as exc:
        raise InputError(
            f"{name} is corrupt: its gzip check failed ({_one_line(exc, with_type=False)}), so some of its bytes "
            "changed after it was written. Download or copy it again."
        ) from None


def _read_voxels(img, name: str) -> np.ndarray:
    """The file's voxels with scl_slope/scl_inter applied, in the smallest exact dtype.

    Integer data with integer scaling (the usual CT: int16 or uint16 with intercept -1024) stays
    integer and becomes int16 if every value fits; anything else becomes float32.
    """
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except _CORRUPT_GZIP as exc:
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
    if np.iscomplexobj(raw):
        if np.any(raw.imag != 0):
            raise InputError(f"{name} stores complex voxels ({raw.dtype}), not grey values: a CT has one real value "
                             "per voxel. Export the CT in Hounsfield units as a real-valued image.")
        raw = np.ascontiguousarray(raw.real)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    if slope == 1 and inter == 0:
        return exact_values(raw, name)
    exact = abs(slope) < 2**40 and abs(inter) < 2**52  # int64 holds any stored integer times these
    if np.issubdtype(raw.dtype, np.integer) and float(slope).is_integer() and float(inter).is_integer() and exact:
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
    unit_known = (int(img.header["xyzt_units"]) & 7) in (1, 2, 3)  # metres, mm, microns
    return all(z == 1.0 for z in zooms) and (domain == DISPLAY8 or not unit_known)


def _form_notes(header, shape, to_mm: float) -> List[str]:
    """A warning when the sform and the qform (both set) put the image in different places."""
    if int(header["sform_code"]) <= 0 or int(header["qform_code"]) <= 0:
        return []
    try:
        sform, qform = header.get_sform(), header.get_qform()
    except Exception:  # an invalid quaternion: only the sform can be used
        return ["its qform (the second position/orientation NIfTI stores) is invalid: the sform is used; other "
                "programs may refuse the file or read it differently."]
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    with np.errstate(all="ignore"):
        gap = float(np.max(np.linalg.norm(((sform - qform) @ corners)[:3], axis=0))) * to_mm
        voxel = float(np.min(np.sqrt((sform[:3, :3] ** 2).sum(axis=0)))) * to_mm
    if np.isfinite(gap) and gap <= max(1e-3, 0.05 * voxel):
        return []
    return [f"its sform and qform (the two positions/orientations NIfTI stores) disagree by up to {gap:.3g} mm: covidseg "
            "uses the sform (as nibabel and FSL do) but other programs (e.g. SimpleITK, ITK-SNAP) may use the qform and "
            "place the image elsewhere; fix the header so that both agree."]


def _to_millimetres(geometry: Geometry, header, factor: float) -> None:
    """Scale a geometry given in metres or microns to mm, and its header copy with it (so a mask saved
    with it is consistent: mm units, the same affine)."""
    geometry.affine[:3, :] *= factor
    if geometry.header is None:
        return
    hdr = geometry.header
    zooms = hdr.get_zooms()
    hdr.set_zooms(tuple(z * factor for z in zooms[:3]) + tuple(zooms[3:]))
    for code_key, getter, setter in (("qform_code", hdr.get_qform, hdr.set_qform), ("sform_code", hdr.get_sform, hdr.set_sform)):
        code = int(header[code_key])
        if code > 0:
            scaled = getter().copy()
            scaled[:3, :] *= factor
            setter(scaled, code=code)
    hdr["xyzt_units"] = 2 | (int(hdr["xyzt_units"]) & ~7)  # mm, the time unit kept


def _nifti_geometry(img, path: Path) -> Tuple[Geometry, List[str]]:
    """The file's geometry in mm (sform, else qform), and warnings about its header."""
    geometry = Geometry.from_nifti(img, source_path=str(path.resolve()))
    geometry.file_shape = tuple(int(s) for s in img.shape[:3])
    code = int(img.header["xyzt_units"]) & 7
    factor = _UNIT_TO_MM.get(code)
    notes = _form_notes(img.header, geometry.file_shape, factor or 1.0)
    if factor is None:
        notes.append(f"its header's spatial unit code ({code}) is none NIfTI defines: millimetres are assumed.")
    elif factor != 1.0:
        _to_millimetres(geometry, img.header, factor)
        notes.append(f"its header gives sizes and positions in {_UNIT_NAMES[code]}: they were converted to mm.")
    if img.get_data_dtype().kind == "c":
        notes.append("its voxels are stored as complex numbers (with zero imaginary parts): the real parts are used.")
    return geometry, notes


def read_nifti(path) -> RawVolume:
    """The voxels (scaling applied) and geometry of a 3D NIfTI file, before the shared checks.

    Guarantees: the file is a regular file holding a readable NIfTI-1/2 (also when its gzip
    compression and its name disagree), 3D (trailing singleton axes dropped), that its bytes can
    hold and this machine's memory can take (checked from the header, before any allocation), with
    finite values; a gzip file is unpacked to its end, so a corrupted byte fails its CRC check; the
    header is refused where nibabel would silently change the geometry (zero or negative voxel size,
    unknown xform codes, voxels inside the header); the geometry is the file's best affine (sform,
    else qform) in mm (metres and microns converted) and a copy of its header.
    """
    path = Path(path).expanduser()
    name = _display_name(path)
    _check_path(path)
    with _nifti_stream(path) as (stream, gzipped):
        img = _open_image(stream, name)
        shape = squeeze_to_3d(img.shape, name)
        stored = path.stat().st_size - (0 if gzipped else int(img.dataobj.offset))
        check_size(shape, img.get_data_dtype().itemsize, name, stored=stored, encoding="deflate" if gzipped else "raw")
        values = _read_voxels(img, name)
        if gzipped:
            _read_to_end(stream, name)
    geometry, notes = _nifti_geometry(img, path)
    unit_spacing = all(float(z) == 1.0 for z in img.header.get_zooms()[:3])
    return RawVolume(values=values, geometry=geometry, name=name, source_format="nifti",
                     spacing_known=not placeholder_spacing(img, "unknown"), unit_spacing=unit_spacing,
                     notes=notes, stored_dtype=str(img.get_data_dtype()))


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
