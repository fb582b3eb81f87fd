"""The ``covidseg`` console script: open CT in napari, inspect a file, segment from the shell.

Sub-commands:

* ``covidseg view [files...] [--sample [small]]``: napari with the files (read by this plugin's
  reader: lung window, mm scale, geometry kept) and/or the synthetic phantom, window widget docked.
* ``covidseg info <file>``: shape, spacing, orientation, value range and kind of a NIfTI file.
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

from .errors import CovidsegError
from .intensity import DISPLAY8, DOMAIN_TITLES

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2

PROG = "covidseg"
SAMPLES = {"full": "chest_phantom", "small": "chest_phantom_small"}
PLUGIN_NAME = "napari-covidseg"
#: dock widgets ``view`` opens (display names from napari.yaml); missing ones are skipped
VIEW_WIDGETS = ("CT window presets", "Segment")
#: optional sub-command modules owned by other parts of the package (``add_parser``, ``run``)
OPTIONAL_SUBCOMMANDS = ("cli_segment", "cli_evaluate")


def _error(message) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- info -----------------------------------------------------------------------------------
def describe_volume(path) -> dict:
    """Facts about a NIfTI file as plain Python values (what ``covidseg info`` prints)."""
    import nibabel as nib

    from .io.nifti import load_volume

    volume = load_volume(path)
    geometry = volume.geometry
    data = volume.data
    facts = {
        "file": str(geometry.source_path or path),
        "kind": volume.kind,
        "shape_zyx": [int(s) for s in data.shape],
        "file_shape": [int(s) for s in geometry.file_shape],
        "spacing_zyx_mm": [round(float(s), 6) for s in geometry.spacing],
        "orientation": "".join(nib.aff2axcodes(geometry.affine)),
        "dtype": str(data.dtype),
        "spacing_known": bool(volume.spacing_known),
        "volume_ml": round(float(np.prod(data.shape)) * geometry.voxel_volume_ml, 3) if volume.spacing_known else None,
    }
    if volume.kind == "labels":
        labels, counts = np.unique(data, return_counts=True)
        facts["labels"] = {int(l): int(c) for l, c in zip(labels, counts)}
    else:
        facts["domain"] = volume.domain
        facts["value_range" if volume.domain == DISPLAY8 else "hu_range"] = [float(data.min()), float(data.max())]
    return facts


def format_facts(facts: dict) -> str:
    z, y, x = facts["shape_zyx"]
    sz, sy, sx = facts["spacing_zyx_mm"]
    kind = f" ({DOMAIN_TITLES[facts['domain']]})" if facts["kind"] == "image" else " (mask)"
    known = facts["spacing_known"]
    lines = [
        f"file:        {facts['file']}",
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
    return "\n".join(lines)


def run_info(args) -> int:
    facts = describe_volume(args.file)
    print(json.dumps(facts, indent=2) if args.json else format_facts(facts))
    return EXIT_OK


# --- view -----------------------------------------------------------------------------------
def open_viewer(files: Sequence[str] = (), sample: Optional[str] = None, widgets: Sequence[str] = VIEW_WIDGETS):
    """A napari viewer with ``files`` and the optional phantom sample loaded; returns the viewer.

    All files are read and checked before any window opens, so a bad file fails fast with its
    message instead of leaving an empty viewer behind.
    """
    from ._reader import layer_name, volume_layer_data
    from .io.nifti import load_volume

    volumes = [(path, load_volume(path)) for path in files]
    check_masks_match_ct([volume for _, volume in volumes])

    import napari

    viewer = napari.Viewer(title="covidseg")
    if sample is not None:
        viewer.open_sample(PLUGIN_NAME, SAMPLES[sample])
    for path, volume in volumes:
        data, kwargs, layer_type = volume_layer_data(volume, layer_name(path))
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    for widget_name in widgets:
        try:
            viewer.window.add_plugin_dock_widget(PLUGIN_NAME, widget_name)
        except Exception as exc:  # a widget of another part may be missing: the viewer still works
            print(f"{PROG}: warning: the '{widget_name}' widget is not available ({exc})", file=sys.stderr)
    images = [layer for layer in viewer.layers if layer.__class__.__name__ == "Image"]
    if images:
        viewer.layers.selection.active = images[0]
    return viewer


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
    open_viewer(args.files, args.sample)
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
        help="open CT/mask NIfTI files (and/or the phantom) in napari",
        description="Open chest CT and masks in napari in the lung window, with correct orientation "
        "(patient left on the right) and voxel size.",
    )
    view.add_argument("files", nargs="*", help=".nii / .nii.gz files (CT in HU, or masks)")
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
        help="print shape, spacing, orientation and value range of a NIfTI file",
        description="Check a NIfTI file the way the viewer would read it.",
    )
    info.add_argument("file", help=".nii / .nii.gz file")
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
