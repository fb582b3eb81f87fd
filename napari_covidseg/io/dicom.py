"""DICOM CT series: a folder of slices (any file names, any order, sub-folders too) as one volume.

Headers are read with pydicom (no pixel data), pixels are decoded by GDCM through SimpleITK, which
applies each slice's Rescale Slope/Intercept, so the values are Hounsfield units.

What :func:`read_series` guarantees for the series it returns:

* slices ordered by their position along the slice normal (the cross product of the two
  ImageOrientationPatient vectors), never by file name or InstanceNumber;
* every slice of the same size, orientation and pixel spacing, evenly spaced along the stack:
  missing slices (a gap) and uneven spacing are refused with the positions of the gap, because a
  volume built from them would put anatomy in the wrong place;
* files at the same position with the same pixels (a copied file) are read once and reported;
  different images at one position (two acquisitions under one series UID) are refused;
* the geometry comes from the slices themselves: column and row spacing from PixelSpacing, the
  slice step from the positions (not SliceThickness), the direction from
  ImageOrientationPatient, converted from DICOM's LPS+ to the RAS+ affine of
  :class:`~napari_covidseg.io.geometry.Geometry`;
* a gantry tilt (slices stacked along a direction that is not their normal) is kept in the affine
  (a shear, which NIfTI's sform stores) and reported in ``notes``;
* a series that is not axial CT slices is refused with its number, description and the reason:
  another modality, a localizer/scout, a secondary capture, a multi-frame object, colour data, a
  transfer syntax GDCM cannot decode, or slices without position/orientation.

Files without the DICOM Part 10 marker (``DICM`` at byte 128) are not DICOM here and are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..intensity import HU
from .geometry import Geometry, lps_to_ras
from .volume import RawVolume, check_size, exact_values, is_regular_file

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
#: transfer syntaxes the GDCM inside SimpleITK decodes (uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000, RLE)
DECODABLE_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
})
#: slices closer than this (mm) along the normal are at the same position
SAME_POSITION_MM = 1e-3
#: transfer syntaxes whose pixel data is stored as is (implicit / explicit little endian, explicit big endian)
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
#: relative deviation of one slice step from the median step that counts as uneven spacing
STEP_TOLERANCE = 0.02
#: tilt (degrees) below which the stack counts as perpendicular to the slices
TILT_TOLERANCE_DEG = 0.05


def is_dicom_file(path) -> bool:
    """True for a regular file with the DICOM Part 10 preamble marker (``DICM`` at byte 128)."""
    if not is_regular_file(path):  # a pipe would block the open below
        return False
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def uid_name(uid: str) -> str:
    """The registered name of a DICOM UID (``1.2.840.10008.1.2.4.90`` -> ``JPEG 2000 ...``)."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else f"UID {uid or 'missing'}"


@dataclass
class DicomSlice:
    """Header facts of one file (no pixel data)."""

    path: Path
    position: Optional[np.ndarray]  # ImagePositionPatient, LPS mm
    orientation: Optional[np.ndarray]  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: Optional[Tuple[float, float]]  # (between rows, between columns) mm
    shape: Tuple[int, int]  # (rows, columns)
    transfer_syntax: str


@dataclass
class DicomSeries:
    """One series of a folder: what :func:`scan_folder` found, and why it cannot be opened (if so)."""

    uid: str
    number: Optional[int]
    description: str
    modality: str
    sop_class: str
    image_type: Tuple[str, ...]
    frames: int
    samples: int
    thickness: Optional[float]
    slices: List[DicomSlice] = field(default_factory=list)
    problem: Optional[str] = None

    def short_title(self) -> str:
        """``series 3 'Thorax 1.0 B70f'``: what a layer made from it is called."""
        number = f"series {self.number}" if self.number is not None else "series"
        return number + (f" '{self.description}'" if self.description else "")

    def title(self) -> str:
        return f"{self.short_title()} ({self.modality or 'no modality'}, {len(self.slices)} file(s))"

    def as_dict(self, index: int) -> dict:
        return {"index": index, "uid": self.uid, "number": self.number, "description": self.description,
                "modality": self.modality, "files": len(self.slices), "usable": self.problem is None,
                "problem": self.problem}


# --- scanning ------------------------------------------------------------------------------
def _floats(value, n: int) -> Optional[np.ndarray]:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _strings(value) -> Tuple[str, ...]:
    """A multi-valued string element (pydicom gives a str for one value) as upper-case strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.upper(),)
    return tuple(str(v).upper() for v in value)


def read_header(path: Path):
    """The pydicom dataset of ``path`` without pixel data, or None when it cannot be parsed."""
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # pydicom raises many types for a broken header
        return None


def _slice_of(ds, path: Path) -> DicomSlice:
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return DicomSlice(
        path=path, position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        shape=(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)),
        transfer_syntax=str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
    )


def _series_of(ds) -> DicomSeries:
    number = ds.get("SeriesNumber")
    thickness = _floats([ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")], 1)
    return DicomSeries(
        uid=str(ds.SeriesInstanceUID), number=int(number) if number not in (None, "") else None,
        description=str(ds.get("SeriesDescription") or "").strip(), modality=str(ds.get("Modality") or "").strip(),
        sop_class=str(ds.get("SOPClassUID") or getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or ""),
        image_type=_strings(ds.get("ImageType")),
        frames=int(ds.get("NumberOfFrames") or 1), samples=int(ds.get("SamplesPerPixel") or 1),
        thickness=None if thickness is None or thickness[0] <= 0 else float(thickness[0]),
    )


def iter_dicom_files(folder, limit: Optional[int] = None) -> Iterator[Path]:
    """The DICOM Part 10 files under ``folder`` (sub-folders included, hidden ones and DICOMDIR not),
    in a stable order; stops after looking at ``limit`` files when given."""
    looked = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.upper() != "DICOMDIR" and not name.startswith(".") and is_dicom_file(path):
                yield path
            looked += 1
            if limit is not None and looked >= limit:
                return


def scan_folder(folder) -> Tuple[List[DicomSeries], List[Path]]:
    """The series under ``folder`` (ordered by series number) and the DICOM files whose header is unreadable."""
    series: Dict[str, DicomSeries] = {}
    broken = []
    for path in iter_dicom_files(Path(folder)):
        ds = read_header(path)
        if ds is None:
            broken.append(path)
            continue
        if "SeriesInstanceUID" not in ds:
            if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) != DICOMDIR_STORAGE:
                broken.append(path)  # cut short, or not an object of any series
            continue
        try:  # pydicom converts values when they are read: a malformed one raises here
            uid = str(ds.SeriesInstanceUID)
            if uid not in series:
                series[uid] = _series_of(ds)
            series[uid].slices.append(_slice_of(ds, path))
        except Exception:
            broken.append(path)
    ordered = sorted(series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
    for s in ordered:
        s.problem = series_problem(s)
    return ordered, broken


# --- what can be opened --------------------------------------------------------------------
def series_problem(series: DicomSeries) -> Optional[str]:
    """Why ``series`` is not a CT volume covidseg can read, or None when it is."""
    if series.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return ("it is a secondary capture (a screenshot or a picture made from images, without the "
                "scanner's geometry), not the CT slices")
    if series.modality != "CT":
        return f"its modality is {series.modality or 'missing'} ({uid_name(series.sop_class)}), not CT"
    if series.sop_class == ENHANCED_CT_STORAGE or series.frames > 1:
        return ("it is a multi-frame (Enhanced CT) object, which covidseg does not read: export the series "
                "as classic CT images, one file per slice")
    if series.sop_class != CT_IMAGE_STORAGE:
        return f"its objects are {uid_name(series.sop_class)}, not CT images"
    if "LOCALIZER" in series.image_type:
        return ("it is a localizer / scout (ImageType " + "\\".join(series.image_type)
                + "): the projection used to plan the scan, not axial slices")
    if series.samples != 1:
        return f"it holds colour images ({series.samples} samples per pixel), not grey CT values"
    undecodable = sorted({s.transfer_syntax for s in series.slices} - DECODABLE_TRANSFER_SYNTAXES)
    if undecodable:
        return (f"its pixel data is compressed as {uid_name(undecodable[0])} ({undecodable[0]}), which the "
                "installed decoder (GDCM in SimpleITK) cannot read: export the series uncompressed or as JPEG / "
                "JPEG 2000 / JPEG-LS / RLE")
    if any(s.position is None or s.orientation is None or s.pixel_spacing is None for s in series.slices):
        return ("some slices lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing, so their place "
                "in the patient is unknown")
    return None


def _refuse(series: DicomSeries, why: str) -> InputError:
    return InputError(f"DICOM {series.title()} cannot be opened: {why}.")


def _check_uniform(series: DicomSeries) -> np.ndarray:
    """The unit slice normal, after checking that every slice has the same size, orientation and spacing."""
    first = series.slices[0]
    for what, values, same in (
        ("size", [s.shape for s in series.slices], lambda a, b: a == b),
        ("orientation", [tuple(s.orientation) for s in series.slices], lambda a, b: np.allclose(a, b, atol=1e-4)),
        ("pixel spacing", [s.pixel_spacing for s in series.slices], lambda a, b: np.allclose(a, b, rtol=1e-5)),
    ):
        other = next((v for v in values if not same(v, values[0])), None)
        if other is not None:
            raise _refuse(series, f"its slices differ in {what} ({values[0]} and {other}): it mixes several "
                                  "stacks under one series UID; export each stack as its own series")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        raise _refuse(series, f"its ImageOrientationPatient {tuple(first.orientation)} is not two perpendicular "
                              "unit vectors")
    return normal / np.linalg.norm(normal)


def _position_groups(series: DicomSeries, normal: np.ndarray) -> List[List[DicomSlice]]:
    """Slices sorted along the normal, files at the same position grouped together."""
    ordered = sorted(series.slices, key=lambda s: float(s.position @ normal))
    groups: List[List[DicomSlice]] = []
    for s in ordered:
        if groups and abs(float((s.position - groups[-1][0].position) @ normal)) < SAME_POSITION_MM:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _check_spacing(series: DicomSeries, groups: List[List[DicomSlice]], normal: np.ndarray) -> None:
    """Refuse gaps (missing slices) and uneven steps; the message names where along the stack."""
    distances = np.array([float(g[0].position @ normal) for g in groups])
    steps = np.diff(distances)
    if steps.size == 0:
        return
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > STEP_TOLERANCE * median + 0.005)
    if bad.size == 0:
        return
    k = int(bad[0])
    where = (f"between positions {distances[k]:.2f} and {distances[k + 1]:.2f} mm along the slice normal "
             f"(files {groups[k][0].path.name} and {groups[k + 1][0].path.name})")
    if steps[k] > 1.5 * median:
        missing = int(round(steps[k] / median)) - 1
        why = (f"about {missing} slice(s) are missing {where}, where a slice is expected every {median:.3g} mm; "
               "a volume with a gap would misplace the anatomy: copy the complete series again")
    else:
        why = (f"its slices are unevenly spaced ({steps.min():.3g} to {steps.max():.3g} mm; first odd step {where}); "
               "resample it to even spacing first (e.g. with dcm2niix or 3D Slicer)")
    raise _refuse(series, why)


def _stack_step(series: DicomSeries, groups: List[List[DicomSlice]], normal: np.ndarray, notes: List[str]) -> np.ndarray:
    """The vector (LPS mm) from one slice's origin to the next; a tilted stack is reported in ``notes``."""
    first, last = groups[0][0].position, groups[-1][0].position
    if len(groups) == 1:
        thickness = series.thickness or 1.0
        if series.thickness is None:
            notes.append("one slice without SliceThickness: its thickness is taken as 1 mm")
        return normal * thickness
    step = (last - first) / (len(groups) - 1)
    off_line = max(float(np.linalg.norm(g[0].position - (first + i * step))) for i, g in enumerate(groups))
    if off_line > 0.05 + 0.01 * float(np.linalg.norm(step)):
        raise _refuse(series, f"its slices do not lie on one straight line (a slice is {off_line:.2f} mm off it)")
    cosine = abs(float(step @ normal)) / float(np.linalg.norm(step))
    tilt = float(np.degrees(np.arccos(min(1.0, cosine))))
    if tilt > TILT_TOLERANCE_DEG:
        notes.append(f"gantry tilt of {tilt:.1f} degrees: slices are shown as acquired (not resampled); the "
                     "geometry keeps the tilt, so masks saved as NIfTI overlay the CT in other viewers")
    return step


# --- reading -------------------------------------------------------------------------------
def _read_pixels(series: DicomSeries, path: Path, shape: Tuple[int, int]) -> np.ndarray:
    """One slice in physical values (GDCM applies RescaleSlope/Intercept)."""
    import SimpleITK as sitk

    from .itk import itk_reason

    syntax = next((one.transfer_syntax for one in series.slices if one.path == path), "")
    if syntax in _UNCOMPRESSED and path.stat().st_size < shape[0] * shape[1]:  # >= 1 byte a pixel, before GDCM allocates
        raise _refuse(series, f"{path.name} is truncated: its header declares {shape[0]} x {shape[1]} pixels but the "
                              f"file has only {path.stat().st_size} bytes; copy the series again")

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise _refuse(series, f"the pixel data of {path.name} could not be decoded ({itk_reason(exc)}); the file is "
                              "probably truncated or corrupt: copy the series again") from None
    if array.size != shape[0] * shape[1]:
        raise _refuse(series, f"{path.name} holds {array.shape} pixels where its header says {shape}")
    return array.reshape(shape)


def _read_stack(series: DicomSeries, groups: List[List[DicomSlice]], notes: List[str]) -> np.ndarray:
    """(slice, row, column) float32 pixels, one per position; identical copies read once and reported."""
    shape = groups[0][0].shape
    check_size((len(groups),) + shape, 4, f"DICOM {series.title()}")
    stack = np.empty((len(groups),) + shape, np.float32)
    copies = []
    for k, group in enumerate(groups):
        stack[k] = _read_pixels(series, group[0].path, shape)
        for other in group[1:]:
            if not np.array_equal(_read_pixels(series, other.path, shape).astype(np.float32), stack[k]):
                raise _refuse(series, f"{group[0].path.name} and {other.path.name} are different images at the same "
                                      "position: the series mixes acquisitions (phases, reconstructions); export "
                                      "them as separate series")
            copies.append(other.path.name)
    if copies:
        notes.append(f"{len(copies)} duplicate file(s) ignored (same position and pixels as another slice, "
                     f"e.g. {copies[0]})")
    return stack


def read_series(series: DicomSeries, source_path: Optional[str] = None) -> RawVolume:
    """The voxels (HU) and geometry of one series, with the checks listed in the module docstring."""
    if series.problem:
        raise _refuse(series, series.problem)
    notes: List[str] = []
    normal = _check_uniform(series)
    groups = _position_groups(series, normal)
    _check_spacing(series, groups, normal)
    step = _stack_step(series, groups, normal, notes)
    stack = _read_stack(series, groups, notes)
    first = groups[0][0]
    between_rows, between_columns = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * between_columns  # file axis 0: along a row (column index)
    lps[:3, 1] = first.orientation[3:] * between_rows  # file axis 1: down a column (row index)
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    name = f"DICOM {series.title()}"
    values = exact_values(stack.transpose(2, 1, 0), name)
    geometry = Geometry(affine=lps_to_ras(lps), file_shape=values.shape, source_path=source_path)
    return RawVolume(values=values, geometry=geometry, name=name, source_format="dicom", domain=HU,
                     kind="image", description=series.short_title(), notes=notes)


# --- choosing a series ---------------------------------------------------------------------
def series_listing(all_series: Sequence[DicomSeries], only_usable: bool = False) -> str:
    """The series as one line: ``1. series 2 'Thorax' (CT, 120 file(s)), UID ...; 2. ...``."""
    items = []
    for index, s in enumerate(all_series, 1):
        if only_usable and s.problem:
            continue
        items.append(f"{index}. {s.title()}, UID {s.uid}" + (f": cannot be opened, {s.problem}" if s.problem else ""))
    return "; ".join(items)


def choose_series(all_series: Sequence[DicomSeries], choice, where: str) -> DicomSeries:
    """The series ``choice`` names (1-based index as listed, or SeriesInstanceUID); with no choice the
    only usable one.  Several usable series without a choice, or none, is an :class:`InputError`
    that lists them."""
    if not all_series:
        raise InputError(f"{where} holds no DICOM image files (files with the DICM marker): choose the folder "
                         "of the CT series, or a .zip of it.")
    usable = [s for s in all_series if s.problem is None]
    if choice is None:
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise InputError(f"{where} holds no DICOM CT series covidseg can open: {series_listing(all_series)}.")
        raise InputError(f"{where} holds {len(usable)} CT series; choose one (command line: --series INDEX or "
                         f"UID): {series_listing(all_series, only_usable=True)}.")
    text = str(choice).strip()
    if text.isdigit():
        if not 1 <= int(text) <= len(all_series):
            raise InputError(f"{where} has no series number {text} in its list (1..{len(all_series)}): "
                             f"{series_listing(all_series)}.")
        chosen = all_series[int(text) - 1]
    else:
        chosen = next((s for s in all_series if s.uid == text), None)
        if chosen is None:
            raise InputError(f"{where} has no series with UID {text}: {series_listing(all_series)}.")
    if chosen.problem:
        raise _refuse(chosen, chosen.problem)
    return chosen


def skipped_note(all_series: Sequence[DicomSeries], chosen: DicomSeries) -> List[str]:
    """A note naming the series of the folder that were not opened, and why."""
    others = [f"{s.title()} ({s.problem})" for s in all_series if s is not chosen and s.problem]
    return [f"also in the folder, not opened: {'; '.join(others)}"] if others else []


def broken_note(broken: Sequence[Path]) -> List[str]:
    return [f"{len(broken)} file(s) with the DICOM marker could not be read (e.g. {broken[0].name}) and were "
            "ignored"] if broken else []


def read_chosen(all_series: Sequence[DicomSeries], broken: Sequence[Path], choice, where: str,
                source_path: str) -> RawVolume:
    """The series ``choice`` names among a folder's scanned series (see :func:`choose_series`), with
    notes naming the series not opened and the unreadable files."""
    chosen = choose_series(all_series, choice, where)
    raw = read_series(chosen, source_path=source_path)
    raw.notes.extend(skipped_note(all_series, chosen) + broken_note(broken))
    return raw


def read_folder(folder, series=None, source_path: Optional[str] = None) -> RawVolume:
    """The chosen (or only usable) CT series under ``folder``; see :func:`choose_series`."""
    folder = Path(folder)
    all_series, broken = scan_folder(folder)
    where = Path(source_path).name if source_path else folder.resolve().name
    return read_chosen(all_series, broken, series, where, source_path or str(folder.resolve()))
