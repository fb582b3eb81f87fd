"""``covidseg segment``: segment lungs and infection in a CT from the command line.

    covidseg segment CT.nii.gz --network unet --out-dir results/
    covidseg segment CT.nii.gz --checkpoint runs/exp1/best.pt --device cuda --out-dir results/ --probabilities
    covidseg segment dicom_folder/ --series 2 --network unet --out-dir results/

The CT is anything :func:`napari_covidseg.io.loader.load_any` reads (NIfTI, NRRD, MetaImage, a
DICOM folder / .zip / .dcm file with ``--series`` where it holds several CT series, 8-bit slices).
Writes ``<case>_<network>_lung<ext>`` and ``<case>_<network>_infection<ext>`` (uint8 0/1) with
the CT's own geometry, and with ``--probabilities`` also ``..._lung_prob<ext>`` and
``..._infection_prob<ext>`` (float32 in [0, 1]; held as float16 while the CT is segmented unless
``--probability-dtype float32``).  ``<ext>`` is the CT's format where it holds
labels (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) and ``.nii.gz`` otherwise (DICOM, slices);
``<case>`` is the CT's name without its suffix, plus ``_series<S>`` when ``--series`` is given.  Existing files are never replaced unless
``--overwrite`` is given; this is checked before the (long) inference starts.

:func:`add_parser` adds the sub-command to ``covidseg``'s argument parser and :func:`run` runs
it, returning the exit status (0 success, 2 user error as for every covidseg command, 130 interrupted).

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
    parser.add_argument("ct", help="chest CT: .nii/.nii.gz, .nrrd, .mha/.mhd, a DICOM folder, .zip or .dcm file, "
                        "or 8-bit PNG/JPEG/TIFF slices (a file or a folder)")
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
    except CovidsegError as exc:
        print(f"covidseg segment: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or an unwritable --out-dir while the masks are written
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"covidseg segment: error: cannot read or write{where}: {exc.strerror or exc}; check the disk and the "
              "paths", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidseg segment: interrupted; no file was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    import numpy as np

    from .inference import HandedOverCT, prepare_network, resolve_device, segment_masks
    from .io.loader import load_any

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    ct_path = Path(args.ct)
    if not ct_path.exists():
        raise InputError(f"CT file {ct_path} does not exist")
    if not 0.0 < args.threshold < 1.0:
        raise InputError(f"--threshold must be between 0 and 1, not {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.patch_size is not None and min(args.patch_size) < 1:
        raise InputError(f"--patch-size must be three positive integers, not {' '.join(map(str, args.patch_size))}")
    device = resolve_device(args.device)  # fail early on a bad device choice
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a folder")

    loaded = _load_model(args)
    outputs = output_paths(ct_path, loaded.network, out_dir, args.probabilities, args.series)
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"output file(s) already exist: {', '.join(existing)}; pass --overwrite to replace them "
                         "or choose another --out-dir")

    prepare_network(loaded, device)  # before the CT is read: an export's transient memory does not stack on it
    volume = load_any(ct_path, series=args.series)
    for note in volume.notes:
        say(f"note: {note}")
    kind = getattr(volume, "kind", None)
    if kind in ("mask", "labels", "label"):
        raise InputError(f"{ct_path} looks like a mask (it holds only a few integer labels), not a CT in HU")
    geometry = volume.geometry
    loaded.preprocessing.check_can_read(volume.domain, f"`{loaded.network}` ({loaded.path})")
    spacing, spacing_known, domain = geometry.spacing, volume.spacing_known, volume.domain
    where = f"at {tuple(round(s, 3) for s in spacing)} mm" if spacing_known else "(voxel size unknown)"
    say(f"segmenting {ct_path.name} {volume.data.shape} (z, y, x) {where}, {DOMAIN_TITLES[domain]}, "
        f"with `{loaded.network}` on {device}")
    # the CT as stored (int16 for most CT: no float copy), handed over: nothing here needs it after
    # the prediction, which lets it go as soon as it can (a 3D network: before its patches run)
    ct = HandedOverCT(np.asarray(volume.data))
    del volume
    started = time.monotonic()
    output = segment_masks(loaded, ct, spacing, threshold=args.threshold, device=device, domain=domain,
                           batch_size=args.batch_size, progress=_progress_printer(args.quiet),
                           probabilities=args.probabilities, probability_dtype=args.probability_dtype,
                           patch_size=args.patch_size, packed=True)
    say(f"done in {time.monotonic() - started:.1f} s")
    # neither the CT nor the network is needed any more: let them go (with the network, what its
    # runtime holds, e.g. ONNX Runtime's memory arena; the runner and the model refer to each
    # other, hence the collection) so that writing the masks does not stack on top of them
    del ct, loaded
    gc.collect()

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = _write_outputs(outputs, output, geometry, args.overwrite, say)
    if not args.quiet:
        lung, infection = counts["lung"], counts["infection"]
        share = f" ({100.0 * infection / lung:.1f}% of lung)" if lung > 0 else ""
        if spacing_known:
            voxel_ml = geometry.voxel_volume_ml
            say(f"lung {lung * voxel_ml:.1f} mL, infection {infection * voxel_ml:.1f} mL{share}")
        else:
            say(f"lung {lung} voxels, infection {infection} voxels{share} (the file's voxel size is a placeholder: no mL)")
    return 0


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
