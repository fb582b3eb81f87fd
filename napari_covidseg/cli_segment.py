"""``covidseg segment``: segment lungs and infection in one CT or a cohort from the command line.

    covidseg segment CT.nii.gz --network unet --out-dir results/
    covidseg segment CT.nii.gz --checkpoint runs/exp1/best.pt --device cuda --out-dir results/ --probabilities
    covidseg segment dicom_folder/ --series 2 --network unet --out-dir results/
    covidseg segment cohort/*.nii.gz --network unet --out-dir results/ --summary results/volumes.csv

The CT is anything :func:`napari_covidseg.io.loader.load_any` reads (NIfTI, NRRD, MetaImage, a
DICOM folder / .zip / .dcm file with ``--series`` where it holds several CT series, 8-bit slices).
Writes ``<case>_<network>_lung<ext>`` and ``<case>_<network>_infection<ext>`` (uint8 0/1) with
the CT's own geometry, and with ``--probabilities`` also ``..._lung_prob<ext>`` and
``..._infection_prob<ext>`` (float32 in [0, 1]; held as float16 while the CT is segmented unless
``--probability-dtype float32``).  ``<ext>`` is the CT's format where it holds
labels (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) and ``.nii.gz`` otherwise (DICOM, slices);
``<case>`` is the CT's name without its suffix, plus ``_series<S>`` when ``--series`` is given.  Existing files are never replaced unless
``--overwrite`` is given; this is checked before the (long) inference starts.

Several CTs (a cohort) are segmented one after the other with the network loaded (and, for ONNX
Runtime, exported) once.  Everything that can be checked before inference is checked for all of
them first: each CT exists, no two CTs would write the same output names, no output exists.  A
CT that fails later (an unreadable file, a mask given as a CT) is reported and skipped; the others
are segmented.  ``--summary FILE.csv`` writes one row per CT: the volumes, involvement, MosMedData
severity and lesion count that the Quantify step reports (:func:`napari_covidseg.quantify.quantify`;
voxel counts where the voxel size is a placeholder), or the CT's error.

:func:`add_parser` adds the sub-command to ``covidseg``'s argument parser and :func:`run` runs
it, returning the exit status (0 success, 2 user error as for every covidseg command, also when
any CT of several failed, 130 interrupted).

Memory: the CT stays in the dtype it was stored in (int16 for a usual CT), the network sees a
batch of slices (2D) or one band of patches (3D) at a time, and the masks are thresholded as they
come and are held bit-packed (see :mod:`napari_covidseg.inference`), so the run needs little more
than the CT; the probability maps, when asked for, add 4 bytes per voxel (float16, 2 channels).
The CT is let go before the masks are written, and they are unpacked one at a time (a writer
holds one uint8 mask and its copy in the file's voxel order), so writing needs no more than that.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import CovidsegError, InputError
from .intensity import DOMAIN_TITLES


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help="segment lungs and COVID-19 infection in a CT (NIfTI, NRRD/MHA, DICOM, 8-bit slices)",
        description="Segment lungs and COVID-19 infection in a chest CT and write the masks with the CT's "
        "geometry (in the CT's format where it holds labels, NIfTI otherwise).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", nargs="+", help="chest CT: .nii/.nii.gz, .nrrd, .mha/.mhd, a DICOM folder, .zip or .dcm "
                        "file, or 8-bit PNG/JPEG/TIFF slices (a file or a folder); several CTs are segmented one after "
                        "the other with the network loaded once")
    parser.add_argument("--series", default=None,
                        help="DICOM series (index as `covidseg info` lists it, or SeriesInstanceUID) when the "
                        "folder holds several CT series")
    parser.add_argument("--network", "-n", default=None,
                        help="registered network name (e.g. unet); uses its shipped weights unless --checkpoint is given")
    parser.add_argument("--checkpoint", "-c", default=None,
                        help="checkpoint file (.pt) from `python -m training train`; its network is checked against --network")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--out-dir", "-o", required=True, help="folder for the output masks (created if missing)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probability maps (float32 files)")
    parser.add_argument("--probability-dtype", choices=("float16", "float32"), default="float16",
                        help="precision the probability maps are held in while the CT is segmented (default float16: "
                        "half the memory; the masks are thresholded from float32 either way)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability above which a voxel is foreground (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices per forward pass for 2D networks (default: 1 on the CPU, where larger batches need "
                        "more memory and are no faster, 4 on a GPU)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="patch size of 3D networks (default: the paper recipe's patch, clipped to the volume; the "
                        "shipped qchc_unet3d: up to 80 slices); smaller patches need less memory and give other results "
                        "near patch borders")
    parser.add_argument("--summary", default=None, metavar="CSV",
                        help="also write a CSV with one row per CT: lung and infection volumes, involvement, severity "
                        "and lesions as the Quantify step reports them (or the CT's error)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")


def case_name(path: Path, series: Optional[str] = None) -> str:
    """The CT's name without its format suffix, with the chosen DICOM series (its index, or the
    last part of its UID)."""
    from .io.loader import volume_stem

    name = volume_stem(path)
    if series is not None:
        name += f"_series{str(series).strip().rsplit('.', 1)[-1]}"
    return name


def output_paths(ct_path: Path, network: str, out_dir: Path, probabilities: bool, series: Optional[str] = None) -> dict:
    from .io.loader import mask_suffix

    case, ext = case_name(ct_path, series), mask_suffix(ct_path)
    names = {"lung": f"{case}_{network}_lung{ext}", "infection": f"{case}_{network}_infection{ext}"}
    if probabilities:
        names["lung_prob"] = f"{case}_{network}_lung_prob{ext}"
        names["infection_prob"] = f"{case}_{network}_infection_prob{ext}"
    return {key: out_dir / name for key, name in names.items()}


def _load_model(args):
    from .checkpoint import load_checkpoint, load_shipped
    from .models.registry import network_names

    if args.checkpoint:
        return load_checkpoint(args.checkpoint, expected_network=args.network, map_location="cpu")
    if not args.network:
        raise InputError(f"give --network NAME (one of: {', '.join(network_names())}) or --checkpoint FILE")
    if args.network not in network_names():
        raise InputError(f"unknown network {args.network!r}; known networks: {', '.join(network_names())}")
    return load_shipped(args.network, map_location="cpu")


def _progress_printer(quiet: bool):
    if quiet:
        return None
    state = {"last": 0.0}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - state["last"] > 0.5:
            state["last"] = now
            text = f"  {done}/{total} ({100.0 * done / max(total, 1):.0f}%)"
            if sys.stderr.isatty():  # redraw one line in a terminal, plain lines in a log file
                print("\r" + text, end="\n" if done == total else "", file=sys.stderr, flush=True)
            else:
                print(text, file=sys.stderr, flush=True)

    return report


def run(args) -> int:
    """Run ``covidseg segment``; returns the process exit status."""
    try:
        return _run(args)
    except (CovidsegError, OSError) as exc:
        print(f"covidseg segment: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidseg segment: interrupted; no file was written", file=sys.stderr)
        return 130


def _message(exc: Exception) -> str:
    """One line for an error: a covidseg error's own text, or what an OSError (a full disk, an
    unwritable --out-dir while the masks are written) means for the user."""
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"cannot read or write{where}: {exc.strerror or exc}; check the disk and the paths"
    return " ".join(str(exc).split())


@dataclass
class Case:
    """One CT of the run and the files it will write."""

    ct: Path
    name: str  # as in the output file names
    outputs: dict


def _check_arguments(args) -> None:
    """InputError for a bad option or a missing CT, before any model is loaded."""
    missing = [str(p) for p in map(Path, args.ct) if not p.exists()]
    if len(missing) == 1:
        raise InputError(f"CT file {missing[0]} does not exist")
    if missing:
        raise InputError(f"CT files {', '.join(missing)} do not exist")
    if args.series is not None and len(args.ct) > 1:
        raise InputError("--series picks a series of one DICOM folder: give one CT with it")
    if not 0.0 < args.threshold < 1.0:
        raise InputError(f"--threshold must be between 0 and 1, not {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.patch_size is not None and min(args.patch_size) < 1:
        raise InputError(f"--patch-size must be three positive integers, not {' '.join(map(str, args.patch_size))}")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a folder")
    summary = Path(args.summary) if args.summary else None
    if summary is not None and summary.is_dir():
        raise InputError(f"--summary {summary} is a folder; give a file name (e.g. volumes.csv)")
    if summary is not None and summary.exists() and not args.overwrite:
        raise InputError(f"--summary {summary} already exists; pass --overwrite to replace it or choose another name")


def plan_cases(args, network: str) -> List[Case]:
    """The CTs with their output files; InputError where two CTs would write the same files or
    where outputs exist (without --overwrite), all checked before the (long) inference starts."""
    cases = [Case(Path(ct), case_name(Path(ct), args.series),
                  output_paths(Path(ct), network, Path(args.out_dir), args.probabilities, args.series))
             for ct in args.ct]
    seen: dict = {}
    for case in cases:
        for path in case.outputs.values():
            if path in seen and seen[path].resolve() == case.ct.resolve():
                raise InputError(f"{case.ct} is given twice")
            if path in seen:
                raise InputError(f"{seen[path]} and {case.ct} would both write {path.name}: segment them into "
                                 "different --out-dir folders")
            seen[path] = case.ct
    existing = [str(p) for p in seen if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"output file(s) already exist: {', '.join(existing)}; pass --overwrite to replace them "
                         "or choose another --out-dir")
    return cases


def _run(args) -> int:
    from .inference import prepare_network, resolve_device

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    _check_arguments(args)
    device = resolve_device(args.device)  # fail early on a bad device choice
    held = [_load_model(args)]  # the run's one reference, let go before the last CT's masks are written
    network = held[0].network
    cases = plan_cases(args, network)
    prepare_network(held[0], device)  # before a CT is read: an export's transient memory does not stack on it
    rows = []
    for number, case in enumerate(cases, start=1):
        if len(cases) > 1:
            say(f"[{number}/{len(cases)}] {case.ct}")
        try:
            rows.append(_segment_case(held, case, args, device, say, last=number == len(cases)))
        except (CovidsegError, OSError) as exc:
            if len(cases) == 1:
                raise
            print(f"covidseg segment: error: {case.ct}: {_message(exc)}", file=sys.stderr)
            rows.append({"ct": str(case.ct), "case": case.name, "network": network, "status": _message(exc)})
        except KeyboardInterrupt:
            if number == 1:
                raise
            if args.summary:
                write_summary(Path(args.summary), rows)
            print(f"covidseg segment: interrupted at {case.ct}; the {number - 1} CTs before it are segmented and "
                  f"written{' (and in the summary)' if args.summary else ''}", file=sys.stderr)
            return 130
    failed = [row["ct"] for row in rows if row["status"] != "ok"]
    if args.summary:
        write_summary(Path(args.summary), rows)
        say(f"wrote {args.summary}")
    if len(cases) > 1:
        say(f"{len(cases) - len(failed)} of {len(cases)} CTs segmented" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 2 if failed else 0


def _segment_case(held: list, case: Case, args, device, say, last: bool) -> dict:
    """Segment one CT and write its masks; returns its summary row.  ``last``: let the network go
    (with what its runtime holds, e.g. ONNX Runtime's arena) before the masks are written."""
    import numpy as np

    from .inference import HandedOverCT, segment_masks
    from .io.loader import load_any

    loaded = held[0]
    volume = load_any(case.ct, series=args.series)
    for note in volume.notes:
        say(f"note: {note}")
    if getattr(volume, "kind", None) in ("mask", "labels", "label"):
        raise InputError(f"{case.ct} looks like a mask (it holds only a few integer labels), not a CT in HU")
    geometry, spacing_known, domain = volume.geometry, volume.spacing_known, volume.domain
    loaded.preprocessing.check_can_read(domain, f"`{loaded.network}` ({loaded.path})")
    where = f"at {tuple(round(s, 3) for s in geometry.spacing)} mm" if spacing_known else "(voxel size unknown)"
    say(f"segmenting {case.ct.name} {volume.data.shape} (z, y, x) {where}, {DOMAIN_TITLES[domain]}, "
        f"with `{loaded.network}` on {device}")
    # the CT as stored (int16 for most CT: no float copy), handed over: nothing here needs it after
    # the prediction, which lets it go as soon as it can (a 3D network: before its patches run)
    ct = HandedOverCT(np.asarray(volume.data))
    del volume
    started = time.monotonic()
    output = segment_masks(loaded, ct, geometry.spacing, threshold=args.threshold, device=device, domain=domain,
                           batch_size=args.batch_size, progress=_progress_printer(args.quiet),
                           probabilities=args.probabilities, probability_dtype=args.probability_dtype,
                           patch_size=args.patch_size, packed=True)
    say(f"done in {time.monotonic() - started:.1f} s")
    network = loaded.network
    del ct, loaded
    if last:  # so that writing the masks does not stack on the network (the runner and the model
        held.clear()  # refer to each other, hence the collection)
    gc.collect()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    counts = _write_outputs(case.outputs, output, geometry, args.overwrite, say)
    _say_volumes(counts, geometry, spacing_known, say)
    row = {"ct": str(case.ct), "case": case.name, "network": network, "status": "ok",
           "lung_file": str(case.outputs["lung"]), "infection_file": str(case.outputs["infection"])}
    if args.summary:
        row.update(summary_figures(output, geometry.spacing, spacing_known))
    return row


def _say_volumes(counts: dict, geometry, spacing_known: bool, say) -> None:
    lung, infection = counts["lung"], counts["infection"]
    share = f" ({100.0 * infection / lung:.1f}% of lung)" if lung > 0 else ""
    if spacing_known:
        voxel_ml = geometry.voxel_volume_ml
        say(f"lung {lung * voxel_ml:.1f} mL, infection {infection * voxel_ml:.1f} mL{share}")
    else:
        say(f"lung {lung} voxels, infection {infection} voxels{share} (the file's voxel size is a placeholder: no mL)")


#: the summary's columns after the CT's name, network and status: Quantify's figures, volumes (its
#: keys end in ``_ml``, or ``_voxels`` where the voxel size is a placeholder) and unit-free ones
SUMMARY_VOLUMES = ("lung", "infection", "infection_outside_lung", "left_lung", "right_lung")
SUMMARY_UNIT_FREE = ("total_involvement_pct", "left_involvement_pct", "right_involvement_pct", "severity_grade",
                     "lung_score_total", "n_lesions")
SUMMARY_FIGURES = ("volume_unit",) + SUMMARY_VOLUMES + SUMMARY_UNIT_FREE
SUMMARY_COLUMNS = ("case", "ct", "network", "status") + SUMMARY_FIGURES + ("lung_file", "infection_file")


def summary_figures(output, spacing, spacing_known: bool) -> dict:
    """Quantify's figures of one CT's masks (mL, or voxels where the voxel size is a placeholder)."""
    from .quantify import quantify

    figures = quantify(output.mask(0), output.mask(1), spacing, spacing_known=spacing_known)
    unit = "_ml" if spacing_known else "_voxels"
    return {"volume_unit": figures["volume_unit"], **{name: figures[name + unit] for name in SUMMARY_VOLUMES},
            **{name: figures[name] for name in SUMMARY_UNIT_FREE}}


def write_summary(path: Path, rows: List[dict]) -> Path:
    """The summary CSV (written whole or not at all), one row per CT in the order given."""
    import csv

    from .atomic_file import atomic_path
    from .report import csv_value

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(SUMMARY_COLUMNS)
            for row in rows:
                writer.writerow([csv_value(row.get(column)) for column in SUMMARY_COLUMNS])
    return path


def _write_outputs(outputs: dict, output, geometry, overwrite: bool, say) -> dict:
    """Write each mask (unpacked one at a time) and probability map; returns the masks' voxel counts."""
    import numpy as np

    from .io.loader import save_any

    counts = {}
    for key, path in outputs.items():  # float16 maps are written as float32 (readable everywhere), one at a time
        channel = 1 if key.startswith("infection") else 0
        if key.endswith("_prob"):
            array = output.probabilities[channel]
            array = array if array.dtype != np.float16 else array.astype(np.float32)
        else:
            array = output.mask(channel)
            counts[key] = int(array.sum())
        save_any(path, array, geometry, overwrite=overwrite)
        del array
        say(f"wrote {path}")
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (``python -m napari_covidseg.cli_segment``)."""
    parser = argparse.ArgumentParser(prog="covidseg segment")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
