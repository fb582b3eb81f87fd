"""The one way into and out of covidseg for volumes, whatever the format.

:func:`load_any` picks a format reader by what the path is and returns a
:class:`~napari_covidseg.io.volume.Volume` after the checks every format shares
(:func:`~napari_covidseg.io.volume.finish_volume`):

=====================================  ==========================================================
path                                   reader
=====================================  ==========================================================
``*.nii``, ``*.nii.gz``                :mod:`.nifti`
``*.nrrd``, ``*.nhdr``, ``*.mha``,     :mod:`.itk` (SimpleITK)
``*.mhd``
a folder with DICOM files (any depth)  :mod:`.dicom`: the chosen series (``series=`` index as
                                       listed, or UID), or the only CT series in it
a ``*.dcm`` (or suffix-less DICOM)     :mod:`.dicom`: the whole series that file belongs to
file
``*.zip``                              unpacked to a temporary folder (:mod:`.archive`), then as
                                       a folder
``*.png``, ``*.jpg``, ``*.tif`` or a   :mod:`.slices`: 8-bit slice images
folder of numbered ones
=====================================  ==========================================================

:func:`load_all` gives every usable series of a DICOM source (what napari shows, one layer each)
and the reasons the others were skipped; :func:`survey` lists the series and reads the chosen one
(``covidseg info``).  :func:`save_any` writes a mask or image by the target's suffix (NIfTI,
NRRD, MHA) with the CT's geometry; :func:`mask_suffix` says which format a mask of a given CT is
saved in by default: the CT's own where it holds labels (NIfTI, NRRD, MetaImage), NIfTI otherwise
(DICOM, slice images).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..errors import InputError
from . import dicom
from .archive import extracted, holds_dicom
from .itk import ITK_SUFFIXES, read_itk
from .nifti import NIFTI_SUFFIXES, read_nifti
from .slices import SLICE_SUFFIXES, is_slice_path, read_slices
from .volume import RawVolume, Volume, finish_volume, require_regular_file

ZIP_SUFFIX = ".zip"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: every suffix a volume file may end in (folders and suffix-less DICOM files come on top)
VOLUME_SUFFIXES = NIFTI_SUFFIXES + tuple(ITK_SUFFIXES) + SLICE_SUFFIXES + DICOM_SUFFIXES + (ZIP_SUFFIX,)
#: files :func:`can_open` looks at in a folder before it says no (napari asks it about any folder dropped)
CAN_OPEN_LOOKS_AT = 2000
#: files that are one whole volume by themselves (a .dcm file is one slice of a series in its folder)
SINGLE_VOLUME_SUFFIXES = NIFTI_SUFFIXES + tuple(ITK_SUFFIXES) + SLICE_SUFFIXES + (ZIP_SUFFIX,)
#: suffix of a saved mask, by the suffix of its CT
_MASK_SUFFIX = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

FORMATS_HELP = ("covidseg reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), DICOM series "
                "(a folder, a .zip of it, or one .dcm file of the series) and 8-bit slice images (.png, .jpg, .tif: "
                "one file or a folder of numbered slices)")


def _suffix(path) -> str:
    name = Path(str(path)).name.lower()
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def source_kind(path) -> str:
    """``"nifti"``, ``"itk"``, ``"slices"``, ``"zip"``, ``"dicom-file"``, ``"folder"``, or ``""`` (unknown)."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if suffix in SLICE_SUFFIXES:
        return "slices"
    if suffix == ZIP_SUFFIX:
        return "zip"
    if suffix in DICOM_SUFFIXES or path.name.upper() == "DICOMDIR" or dicom.is_dicom_file(path):
        return "dicom-file"
    return ""


def is_volume_path(path) -> bool:
    """Cheap test (names only, no file read) that ``path`` may be a volume: a known suffix or a folder."""
    path = Path(path)
    return not path.name.startswith(".") and (path.is_dir() or bool(_suffix(path)))


def is_single_volume_file(path) -> bool:
    """A file that holds one whole volume (NIfTI, NRRD/MHA header, slice image, zip): one case of a data folder."""
    path = Path(path)
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(SINGLE_VOLUME_SUFFIXES)


def can_open(path) -> bool:
    """Whether :func:`load_any` would try ``path`` (a folder counts when it holds DICOM or slice images)."""
    path = Path(path)
    kind = source_kind(path)
    if kind != "folder":
        return bool(kind)
    return any(is_slice_path(p) for p in path.iterdir()) or bool(_first_dicom(path, limit=CAN_OPEN_LOOKS_AT))


def is_dicom_source(path) -> bool:
    """Whether ``path`` is read as DICOM: a DICOM file, a folder or a zip that holds one."""
    path = Path(path)
    kind = source_kind(path)
    if kind == "folder":
        return _first_dicom(path) is not None
    return kind == "dicom-file" or (kind == "zip" and holds_dicom(path))


def _first_dicom(folder: Path, limit: Optional[int] = None) -> Optional[Path]:
    """The first DICOM file under ``folder`` (sub-folders too), looking at ``limit`` files at most."""
    return next(dicom.iter_dicom_files(folder, limit), None)


def volume_stem(path) -> str:
    """A volume's name without its format suffix (a folder keeps its name): the case id."""
    path = Path(str(path))
    suffix = "" if path.is_dir() else _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def mask_suffix(ct_source_path) -> str:
    """The suffix of a mask saved for the CT read from ``ct_source_path``."""
    return _MASK_SUFFIX.get(_suffix(ct_source_path or ""), ".nii.gz")


# --- sources ------------------------------------------------------------------------------
@dataclass
class _Source:
    """What a path opens to: a folder to read (a zip unpacked), whether it is DICOM, the series of a .dcm."""

    path: Path
    kind: str
    folder: Optional[Path] = None
    is_dicom: bool = False
    file_uid: Optional[str] = None


@contextmanager
def _opened(path: Path) -> Iterator[_Source]:
    """The source at ``path``; a zip stays unpacked while the block runs."""
    kind = source_kind(path)
    if kind == "zip":
        with extracted(path) as root:
            yield _Source(path, kind, root, _first_dicom(root) is not None)
    elif kind == "folder":
        yield _Source(path, kind, path, _first_dicom(path) is not None)
    elif kind == "dicom-file":
        yield _Source(path, kind, path.parent, True, _series_uid_of(path))
    else:
        yield _Source(path, kind)


def _series_uid_of(path: Path) -> Optional[str]:
    if path.name.upper() == "DICOMDIR":
        return None  # the folder it indexes: every series in it
    if not dicom.is_dicom_file(path):
        raise InputError(f"{path.name} is not a DICOM file (no DICM marker): it may be truncated or another format "
                         f"renamed. {FORMATS_HELP}.")
    ds = dicom.read_header(path)
    if ds is None or "SeriesInstanceUID" not in ds:
        raise InputError(f"The DICOM header of {path.name} could not be read: the file is truncated or corrupt.")
    return str(ds.SeriesInstanceUID)


def _read_non_dicom(source: _Source, series) -> RawVolume:
    path = source.path
    if series is not None:
        raise InputError(f"--series chooses a DICOM series; {path.name} is not a DICOM folder, file or archive.")
    if source.kind == "nifti":
        return read_nifti(path)
    if source.kind == "itk":
        return read_itk(path)
    if source.kind == "slices":
        return read_slices(path)
    if source.folder is not None:  # a folder, or a zip unpacked: numbered slices
        raw = read_slices(source.folder)
        raw.geometry.source_path, raw.name = str(path.resolve()), path.name
        return raw
    raise InputError(f"{path.name}: this kind of file is not read here. {FORMATS_HELP}.")


def _check_exists(path) -> Path:
    """``path`` if it is a folder or a regular file (a pipe or a device could block forever), else an InputError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path and the file name.")
    return path if path.is_dir() else require_regular_file(path)


# --- loading -------------------------------------------------------------------------------
def load_any(path, kind: str = "auto", series=None, check_hounsfield: bool = True) -> Volume:
    """Read any supported volume (see the module docstring) into a display-ordered :class:`Volume`.

    ``series`` chooses a DICOM series: its 1-based index in :func:`survey`'s list or its
    SeriesInstanceUID; without it a DICOM source must hold exactly one CT series that can be
    opened (a .dcm file: its own series).  ``kind`` and ``check_hounsfield`` are as in
    :func:`~napari_covidseg.io.volume.finish_volume`.  Everything that cannot be used raises
    :class:`~napari_covidseg.errors.InputError` with a message for the user.
    """
    path = _check_exists(path)
    with _opened(path) as source:
        if not source.is_dicom:
            raw = _read_non_dicom(source, series)
        else:
            all_series, broken = dicom.scan_folder(source.folder)
            choice = series if series is not None else source.file_uid
            raw = dicom.read_chosen(all_series, broken, choice, path.name, str(path.resolve()))
    return finish_volume(raw, kind=kind, check_hounsfield=check_hounsfield)


def load_all(path, kind: str = "auto") -> Tuple[List[Volume], List[str]]:
    """Every volume at ``path`` (each usable series of a DICOM source, else the one volume) and, for
    DICOM, one message per series that could not be opened (and per unreadable file)."""
    path = _check_exists(path)
    with _opened(path) as source:
        if not source.is_dicom or source.file_uid is not None:
            return [load_any(path, kind=kind)], []
        all_series, broken = dicom.scan_folder(source.folder)
        if not all_series:
            dicom.choose_series(all_series, None, path.name)  # raises: no DICOM image files
        volumes, problems = [], dicom.broken_note(broken)
        for s in all_series:
            try:
                volumes.append(finish_volume(dicom.read_series(s, source_path=str(path.resolve())), kind=kind))
            except InputError as error:
                problems.append(str(error))
    return volumes, problems


def survey(path, series=None) -> Tuple[List[dict], Optional[Volume]]:
    """The DICOM series at ``path`` (as dicts; empty for other formats) and the volume that
    ``series`` (or the only usable series, or the non-DICOM file) gives, None where a choice is needed."""
    path = _check_exists(path)
    with _opened(path) as source:
        if not source.is_dicom:
            return [], finish_volume(_read_non_dicom(source, series))
        all_series, broken = dicom.scan_folder(source.folder)
        listed = [s.as_dict(i) for i, s in enumerate(all_series, 1)]
        choice = series if series is not None else source.file_uid
        if choice is None and sum(s.problem is None for s in all_series) > 1:
            return listed, None
        raw = dicom.read_chosen(all_series, broken, choice, path.name, str(path.resolve()))
    return listed, finish_volume(raw)


# --- saving --------------------------------------------------------------------------------
def save_any(path, display_array, geometry, overwrite: bool = False) -> Path:
    """Write a display-ordered array with ``geometry`` in the format its suffix names
    (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); atomic, never over an existing file unless asked."""
    from . import itk, nifti

    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return nifti.save_volume(path, display_array, geometry, overwrite=overwrite)
    if suffix in ITK_SUFFIXES:
        return itk.save_volume(path, display_array, geometry, overwrite=overwrite)
    raise InputError(f"{Path(str(path)).name}: masks and images are saved as {', '.join(WRITABLE_SUFFIXES)}; "
                     "choose a name with one of these endings.")
