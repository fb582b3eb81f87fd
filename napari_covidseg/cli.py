"""The ``covidseg`` console script: open CT in napari, inspect a file, segment from the shell.

Sub-commands:

* ``covidseg view [paths...] [--series S] [--sample [small]]``: napari with the files, folders or
  archives (read by this plugin's loader: lung window, mm scale, geometry kept; every CT series of
  a DICOM folder, or the one ``--series`` names) and/or the synthetic phantom, window widget docked.
* ``covidseg info <path> [--series S]``: shape, spacing, orientation, value range and kind of a
  volume in any format the loader reads; for DICOM, the list of series and why any cannot be opened.
* ``covidseg segment ...``: registered from :mod:`napari_covidseg.cli_segment` when it is installed.

Every user error ends as one line ``covidseg: error: <what is wrong and what to do>`` on stderr
and exit status 2 (argparse's convention for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional, Sequence

import numpy as np

from .errors import CovidsegError, InputError
from .intensity import DISPLAY8, DOMAIN_TITLES

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2

PROG = "covidseg"
SAMPLES = {"full": "chest_phantom", "small": "chest_phantom_small"}
PLUGIN_NAME = "napari-covidseg"
#: dock widgets ``view`` opens (display names from napari.yaml); missing ones are skipped
VIEW_WIDGETS = ("COVID-19 CT",)
SERIES_HELP = ("DICOM series to open: its index as `covidseg info` lists it, or its SeriesInstanceUID "
               "(needed when a folder holds several CT series)")
#: optional sub-command modules owned by other parts of the package (``add_parser``, ``run``)
OPTIONAL_SUBCOMMANDS = ("cli_segment", "cli_evaluate")


def _error(message) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- info -----------------------------------------------------------------------------------
def describe_volume(path, series=None) -> dict:
    """Facts about a volume (and, for DICOM, its series) as plain Python values (what ``covidseg info`` prints).

    A DICOM source with several CT series and no ``series`` gives the list only, with a ``choose`` hint.
    """
    from .io.loader import survey

    listed, volume = survey(path, series=series)
    facts: dict = {"file": str(path)}
    if listed:
        facts["series"] = listed
    if volume is None:
        facts["choose"] = "several CT series: pass --series INDEX (as listed) or UID to describe one"
        return facts
    facts.update(_volume_facts(volume))
    return facts


def _volume_facts(volume) -> dict:
    import nibabel as nib

    geometry = volume.geometry
    data = volume.data
    facts = {
        "file": str(geometry.source_path),
        "format": volume.source_format,
        "kind": volume.kind,
        "shape_zyx": [int(s) for s in data.shape],
        "file_shape": [int(s) for s in geometry.file_shape],
        "spacing_zyx_mm": [round(float(s), 6) for s in geometry.spacing],
        "orientation": "".join(nib.aff2axcodes(geometry.affine)),
        "dtype": str(data.dtype),
        "spacing_known": bool(volume.spacing_known),
        "volume_ml": round(float(np.prod(data.shape)) * geometry.voxel_volume_ml, 3) if volume.spacing_known else None,
        "notes": list(volume.notes),
    }
    if volume.description:
        facts["description"] = volume.description
    if volume.kind == "labels":
        labels, counts = np.unique(data, return_counts=True)
        facts["labels"] = {int(l): int(c) for l, c in zip(labels, counts)}
    else:
        facts["domain"] = volume.domain
        facts["value_range" if volume.domain == DISPLAY8 else "hu_range"] = [float(data.min()), float(data.max())]
    return facts


def _series_lines(facts: dict) -> List[str]:
    lines = ["series:"]
    for s in facts["series"]:
        status = "" if s["usable"] else f"  -- cannot be opened: {s['problem']}"
        description = f" '{s['description']}'" if s["description"] else ""
        lines.append(f"  {s['index']}. series {s['number']}{description} ({s['modality']}, {s['files']} files) "
                     f"UID {s['uid']}{status}")
    return lines


def format_facts(facts: dict) -> str:
    lines = [f"file:        {facts['file']}"]
    if "series" in facts:
        lines += _series_lines(facts)
    if "shape_zyx" not in facts:
        return "\n".join(lines + [facts["choose"]])
    z, y, x = facts["shape_zyx"]
    sz, sy, sx = facts["spacing_zyx_mm"]
    kind = f" ({DOMAIN_TITLES[facts['domain']]})" if facts["kind"] == "image" else " (mask)"
    known = facts["spacing_known"]
    lines += [
        f"format:      {facts['format']}" + (f", {facts['description']}" if facts.get("description") else ""),
        f"kind:        {facts['kind']}{kind}",
        f"shape:       {z} x {y} x {x} (z, y, x); in the file {tuple(facts['file_shape'])}",
        f"spacing:     {sz:g} x {sy:g} x {sx:g} mm (z, y, x)" + ("" if known else ": a placeholder, not a measurement"),
        f"orientation: {facts['orientation']} (file axes; shown as L P S: patient left on the right)",
        f"dtype:       {facts['dtype']}",
        f"field:       {facts['volume_ml']:g} mL (whole volume)" if known else "field:       unknown (no real voxel size)",
    ]
    if "hu_range" in facts:
        lo, hi = facts["hu_range"]
        lines.append(f"HU range:    {lo:g} .. {hi:g}")
    elif "value_range" in facts:
        lo, hi = facts["value_range"]
        lines.append(f"values:      {lo:g} .. {hi:g} (8-bit display values, not HU)")
    else:
        lines.append("labels:      " + ", ".join(f"{l}: {c} voxels" for l, c in facts["labels"].items()))
    lines += [f"note:        {note}" for note in facts["notes"]]
    return "\n".join(lines)


def run_info(args) -> int:
    facts = describe_volume(args.file, series=args.series)
    print(json.dumps(facts, indent=2) if args.json else format_facts(facts))
    return EXIT_OK


# --- view -----------------------------------------------------------------------------------
def open_viewer(files: Sequence[str] = (), sample: Optional[str] = None, widgets: Sequence[str] = VIEW_WIDGETS,
                series: Optional[str] = None):
    """A napari viewer with ``files`` and the optional phantom sample loaded; returns the viewer.

    All files are read and checked before any window opens, so a bad file fails fast with its
    message instead of leaving an empty viewer behind.  A DICOM source gives every CT series it
    holds, or only ``series`` (index or UID) when given.
    """
    from ._reader import series_layer_name, volume_layer_data

    named = read_for_view(files, series)
    check_masks_match_ct([volume for _, volume in named])

    import napari

    _no_qt5_deprecation_toast()
    viewer = napari.Viewer(title="covidseg")
    if sample is not None:
        viewer.open_sample(PLUGIN_NAME, SAMPLES[sample])
    for path, volume in named:
        data, kwargs, layer_type = volume_layer_data(volume, series_layer_name(path, volume))
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    for widget_name in widgets:
        try:
            dock, _widget = viewer.window.add_plugin_dock_widget(PLUGIN_NAME, widget_name)
        except Exception as exc:  # a widget of another part may be missing: the viewer still works
            print(f"{PROG}: warning: the '{widget_name}' widget is not available ({exc})", file=sys.stderr)
            continue
        if widget_name == VIEW_WIDGETS[0]:
            from .widgets.workspace import lay_out

            lay_out(viewer, dock)
    images = [layer for layer in viewer.layers if layer.__class__.__name__ == "Image"]
    if images:
        viewer.layers.selection.active = images[0]
    return viewer


def _no_qt5_deprecation_toast() -> None:
    """napari 0.9 greets every window with a toast that its PyQt5 support is deprecated: news for
    developers (setup.cfg bounds napari below the release that drops it), not for a radiologist.
    napari's own test fixture turns it off through the same flag; every other warning still shows."""
    try:
        from napari._qt import qt_main_window
    except ImportError:  # pragma: no cover - a napari without Qt cannot open a window anyway
        return
    if hasattr(qt_main_window, "SHOW_QT_WARNING"):
        qt_main_window.SHOW_QT_WARNING = False


def read_for_view(files: Sequence[str], series: Optional[str] = None) -> list:
    """(path, Volume) pairs for ``covidseg view``; skipped DICOM series and notes are printed as warnings.

    ``series`` applies to the DICOM sources among ``files`` (folders, archives, .dcm files).
    """
    from .io.loader import is_dicom_source, load_all, load_any

    if series is not None and not any(is_dicom_source(path) for path in files):
        raise InputError("--series chooses a DICOM series, and none of the paths is a DICOM folder, archive or file")
    named = []
    for path in files:
        if series is not None and is_dicom_source(path):
            volumes, problems = [load_any(path, series=series)], []
        else:
            volumes, problems = load_all(path)
        if not volumes:
            raise InputError(f"{path}: no CT series could be opened: {' | '.join(problems)}")
        for problem in problems:
            print(f"{PROG}: warning: {path}: not opened: {problem}", file=sys.stderr)
        for volume in volumes:
            for note in volume.notes:
                print(f"{PROG}: note: {path}: {note}", file=sys.stderr)
            named.append((path, volume))
    return named


def check_masks_match_ct(volumes) -> None:
    """Each mask must lie on the grid of the first CT given with it (InputError otherwise)."""
    from .io.nifti import KIND_IMAGE, KIND_LABELS, check_same_grid

    cts = [v for v in volumes if v.kind == KIND_IMAGE]
    if not cts:
        return
    for mask in (v for v in volumes if v.kind == KIND_LABELS):
        check_same_grid(mask, cts[0])


def run_view(args) -> int:
    if not args.files and args.sample is None:
        return _error("give at least one CT/mask file or --sample, e.g. 'covidseg view ct.nii.gz' or 'covidseg view --sample'")
    open_viewer(args.files, args.sample, series=args.series)
    import napari

    napari.run()
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------
def _optional_subcommand_modules():
    """Sub-command modules that exist in this installation (imported lazily)."""
    modules = []
    for name in OPTIONAL_SUBCOMMANDS:
        try:
            modules.append(importlib.import_module(f"{__package__}.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue  # not part of this installation: no such sub-command
            # it exists but something it needs is missing: keep view/info working, say why
            print(f"{PROG}: warning: '{name}' is unavailable ({exc})", file=sys.stderr)
        except ImportError as exc:
            print(f"{PROG}: warning: '{name}' is unavailable ({exc})", file=sys.stderr)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Lung and COVID-19 infection segmentation of chest CT (napari plugin command line).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    view = subparsers.add_parser(
        "view",
        help="open CT/mask files, DICOM folders or archives (and/or the phantom) in napari",
        description="Open chest CT and masks in napari in the lung window, with correct orientation "
        "(patient left on the right) and voxel size.",
    )
    view.add_argument("files", nargs="*", help="CT or mask: .nii/.nii.gz, .nrrd, .mha/.mhd, a DICOM folder, "
                      ".zip or .dcm file, PNG/JPEG/TIFF slices (a file or a folder)")
    view.add_argument("--series", default=None, help=SERIES_HELP)
    view.add_argument(
        "--sample",
        nargs="?",
        const="full",
        choices=sorted(SAMPLES),
        help="also open the synthetic chest CT phantom ('small' for a fast one)",
    )
    view.set_defaults(func=run_view)

    info = subparsers.add_parser(
        "info",
        help="print shape, spacing, orientation and value range of a volume; list the series of a DICOM folder",
        description="Check a volume the way the viewer would read it (any format covidseg reads).",
    )
    info.add_argument("file", help="a volume file, a DICOM folder, .zip or .dcm file, or a folder of slices")
    info.add_argument("--series", default=None, help=SERIES_HELP)
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=run_info)

    for module in _optional_subcommand_modules():
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``covidseg`` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message printed)
        return int(exit_.code or 0) if isinstance(exit_.code, int) or exit_.code is None else EXIT_USAGE
    except ImportError as exc:
        return _error(f"a part of covidseg could not be loaded ({exc}); reinstall the package")
    try:
        return int(args.func(args) or 0)
    except CovidsegError as exc:
        return _error(exc)
    except FileNotFoundError as exc:
        return _error(f"{exc.filename or exc}: no such file or folder")
    except OSError as exc:
        return _error(f"{exc}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line, no traceback dump
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
