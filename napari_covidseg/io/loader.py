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
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..errors import InputError
from . import dicom
from .archive import extracted, holds_dicom
from .itk import ITK_SUFFIXES, read_itk
from .nifti import NIFTI_SUFFIXES, read_nifti
from .slices import SLICE_SUFFIXES, is_slice_path, read_slices
from .volume import RawVolume, Volume, finish_volume

ZIP_SUFFIX = ".zip"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: every suffix a volume file may end in (folders and suffix-less DICOM files come on top)
VOLUME_SUFFIXES = NIFTI_SUFFIXES + tuple(ITK_SUFFIXES) + SLICE_SUFFIXES + DICOM_SUFFIXES + (ZIP_SUFFIX,)
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
    return any(is_slice_path(p) for p in path.iterdir()) or bool(_first_dicom(path))


def is_dicom_source(path) -> bool:
    """Whether ``path`` is read as DICOM: a DICOM file, a folder or a zip that holds one."""
    path = Path(path)
    kind = source_kind(path)
    if kind == "folder":
        return _first_dicom(path) is not None
    return kind == "dicom-file" or (kind == "zip" and holds_dicom(path))


def _first_dicom(folder: Path) -> Optional[Path]:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if dicom.is_dicom_file(path):
            return path
    return None


def volume_stem(path) -> str:
    """A volume's name without its format suffix (a folder keeps its name): the case id."""
    path = Path(str(path))
    suffix = "" if path.is_dir() else _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def mask_suffix(ct_source_path) -> str:
    """The suffix of a mask saved for the CT read from ``ct_source_path``."""
    return _MASK_SUFFIX.get(_suffix(ct_source_path or ""), ".nii.gz")


# --- DICOM sources -------------------------------------------------------------------------
@contextmanager
def _dicom_folder(path: Path) -> Iterator[Optional[Tuple[Path, Optional[str]]]]:
    """(folder to scan, UID of the one file given or None) when ``path`` is a DICOM source, else None."""
    kind = source_kind(path)
    if kind == "zip":
        with extracted(path) as root:
            yield (root, None) if _first_dicom(root) else None
    elif kind == "folder":
        yield (path, None) if _first_dicom(path) else None
    elif kind == "dicom-file":
        yield path.parent, _series_uid_of(path)
    else:
        yield None


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


def _read_non_dicom(path: Path, kind: str, series) -> RawVolume:
    if series is not None:
        raise InputError(f"--series chooses a DICOM series; {path.name} is not a DICOM folder, file or archive.")
    if kind == "nifti":
        return read_nifti(path)
    if kind == "itk":
        return read_itk(path)
    if kind == "slices":
        return read_slices(path)
    if kind == "zip":
        with extracted(path) as root:
            raw = read_slices(root)
        raw.geometry.source_path, raw.name = str(path.resolve()), path.name
        return raw
    if kind == "folder":
        return read_slices(path)
    raise InputError(f"{path.name}: this kind of file is not read here. {FORMATS_HELP}.")


def _check_exists(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path and the file name.")
    return path


# --- loading -------------------------------------------------------------------------------
def load_any(path, kind: str = "auto", series=None, check_hounsfield: bool = True) -> Volume:
    """Read any supported volume (see the module docstring) into a display-ordered :class:`Volume`.

    ``series`` chooses a DICOM series: its 1-based index in :func:`survey`'s list or its
    SeriesInstanceUID; without it a DICOM source must hold exactly one CT series that can be
    opened.  ``kind`` and ``check_hounsfield`` are as in
    :func:`~napari_covidseg.io.volume.finish_volume`.  Everything that cannot be used raises
    :class:`~napari_covidseg.errors.InputError` with a message for the user.
    """
    path = _check_exists(path)
    with _dicom_folder(path) as source:
        if source is None:
            raw = _read_non_dicom(path, source_kind(path), series)
        else:
            folder, file_uid = source
            raw = dicom.read_folder(folder, series if series is not None else file_uid,
                                    source_path=str(path.resolve()))
    return finish_volume(raw, kind=kind, check_hounsfield=check_hounsfield)


def load_all(path, kind: str = "auto") -> Tuple[List[Volume], List[str]]:
    """Every volume at ``path`` (each usable series of a DICOM source, else the one volume) and, for
    DICOM, one message per series that could not be opened."""
    path = _check_exists(path)
    with _dicom_folder(path) as source:
        if source is None or source[1] is not None:
            return [load_any(path, kind=kind)], []
        all_series, broken = dicom.scan_folder(source[0])
        volumes, problems = [], dicom.broken_note(broken)
        for s in all_series:
            try:
                raw = dicom.read_series(s, source_path=str(path.resolve()))
                volumes.append(finish_volume(raw, kind=kind))
            except InputError as error:
                problems.append(str(error))
    if not all_series:
        dicom.choose_series(all_series, None, path.name)  # raises: no DICOM image files
    return volumes, problems


def survey(path, series=None) -> Tuple[List[dict], Optional[Volume]]:
    """The DICOM series at ``path`` (as dicts; empty for other formats) and the volume that
    ``series`` (or the only usable series, or the non-DICOM file) gives, None where a choice is needed."""
    path = _check_exists(path)
    with _dicom_folder(path) as source:
        if source is None:
            return [], load_any(path, series=series)
        all_series, broken = dicom.scan_folder(source[0])
        listed = [s.as_dict(i) for i, s in enumerate(all_series, 1)]
        choice = series if series is not None else source[1]
        usable = [s for s in all_series if s.problem is None]
        if choice is None and len(usable) != 1:
            if not usable:
                dicom.choose_series(all_series, None, path.name)  # raises with the reasons
            return listed, None
        chosen = dicom.choose_series(all_series, choice, path.name)
        raw = dicom.read_series(chosen, source_path=str(path.resolve()))
        raw.notes.extend(dicom.skipped_note(all_series, chosen) + dicom.broken_note(broken))
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
