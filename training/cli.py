"""Command line: ``python -m training {train,evaluate,check-data,recipes}`` (console script
``covidseg-train``).  Exit codes: 0 done (also after a clean stop on SIGINT/SIGTERM); 2 for every
error the user can act on (bad data folder, arguments or checkpoint, a full disk, a diverging loss),
with one line ``error: <what is wrong and what to do>`` on stderr and never a traceback; 1 for an
unexpected failure (a bug), also as one line (``train`` writes its traceback to ``train.log``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from napari_covidseg.errors import CovidsegError

LAYOUT_CHOICES = ("auto", "covid19ctseg", "medseg", "pairs", "phantom")


def _json_arg(text: str):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"base\": 8}}', not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidseg-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a registered network (paper recipe by default)")
    t.add_argument("--network", required=True, help="registered network name (see `recipes`)")
    t.add_argument("--data", required=True, action="append", metavar="SOURCE",
                   help="data folder (repeat for several), or 'phantom'; options after commas: "
                        "labels=lung+infection (masks to trust), weight=W (share of samples), cases=N (phantom), layout=NAME")
    t.add_argument("--layout", choices=LAYOUT_CHOICES, default=None)
    t.add_argument("--out", required=True, help="output folder for checkpoints and logs")
    t.add_argument("--config", help="JSON file with any recipe/config field (flags override it)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--optimizer", choices=("adam", "adamw", "rmsprop", "sgd"))
    t.add_argument("--schedule", choices=("poly", "plateau", "cosine", "constant"))
    t.add_argument("--plateau-factor", type=float, help="plateau schedule: lr multiplier (default: the recipe's)")
    t.add_argument("--plateau-patience", type=int, help="plateau schedule: epochs without improvement before a cut")
    t.add_argument("--input-size", type=int, nargs="+", help="H W (2D) or D H W (3D patch)")
    t.add_argument("--target-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="3D networks: resample to this spacing (mm)")
    t.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="2D: train on random crops of the input-size slices")
    t.add_argument("--inplane-size", type=int, nargs=2, metavar=("H", "W"), help="3D on 8-bit data: resize slices to this")
    t.add_argument("--domain", choices=("auto", "hu", "display8"), help="intensity domain to learn in (auto: 8-bit if any case is)")
    t.add_argument("--hu-to-display8", choices=("recipe", "lung_window"),
                   help="8-bit runs: how a HU CT is mapped (recipe: the COVID-19-CT-Seg PNG recipe, default)")
    t.add_argument("--augmentation", nargs="*", help="e.g. flip rotate scale gamma noise (none: no augmentation)")
    t.add_argument("--target", choices=("lung", "infection", "both"))
    t.add_argument("--val-fraction", type=float)
    t.add_argument("--test-fraction", type=float)
    t.add_argument("--folds", type=int)
    t.add_argument("--fold", type=int)
    t.add_argument("--split", dest="split_file", help="reuse a split.json")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--amp", dest="amp", action="store_true", default=None, help="mixed precision on CUDA (default)")
    t.add_argument("--no-amp", dest="amp", action="store_false")
    t.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <out>/last.pt when it exists (then "
                   "--init-from is skipped: the run started from those weights), so one command line starts and restarts a run")
    t.add_argument("--init-from", help="checkpoint to fine-tune from, or 'shipped'")
    t.add_argument("--phantom-cases", type=int)
    t.add_argument("--phantom-shape", type=int, nargs=3, metavar=("Z", "Y", "X"))
    t.add_argument("--network-kwargs", type=_json_arg, help="JSON constructor arguments, e.g. '{\"base\": 8}'")
    t.add_argument("--net-kwargs-shipped", action="store_true", default=None, help="use the small shipped variant's arguments")
    t.add_argument("--num-workers", type=int)
    t.add_argument("--max-steps-per-epoch", type=int)
    t.add_argument("--slices-per-epoch", "--samples-per-epoch", dest="samples_per_epoch", type=int)
    t.add_argument("--stop-after-epochs", type=int, help="end this invocation after N epochs (resume later)")
    t.add_argument("--time-budget", dest="time_budget_minutes", type=float, metavar="MIN",
                   help="re-fit the planned epochs to MIN minutes of wall clock after every epoch (never above --epochs)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")

    e = sub.add_parser("evaluate", help="whole-volume metrics of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, action="append", metavar="SOURCE", help="as for train (repeat for several)")
    e.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto")
    e.add_argument("--split", help="split.json of the training run")
    e.add_argument("--subset", choices=("train", "val", "test", "all"), default="all")
    e.add_argument("--out", required=True)
    e.add_argument("--device", default="auto")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--phantom-cases", type=int, default=8)
    e.add_argument("--phantom-shape", type=int, nargs=3, default=[32, 192, 192])

    c = sub.add_parser("check-data", help="print (JSON) what data folders hold, per source and intensity domain")
    c.add_argument("data", nargs="+", help="one or more sources (as for train --data)")
    c.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto")
    c.add_argument("--phantom-cases", type=int, default=8)
    c.add_argument("--phantom-shape", type=int, nargs=3, default=[32, 192, 192])

    sub.add_parser("recipes", help="print each network's paper recipe (JSON)")
    return parser


def _train(args) -> int:
    from .config import build_config
    from .trainer import run_training

    overrides = {k: getattr(args, k) for k in (
        "network", "data", "layout", "out", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "schedule",
        "plateau_factor", "plateau_patience", "input_size", "target_spacing", "crop_size", "inplane_size", "domain",
        "hu_to_display8", "augmentation", "target", "val_fraction", "test_fraction", "folds", "fold", "split_file", "seed",
        "device", "amp", "resume", "init_from", "phantom_cases", "phantom_shape", "network_kwargs", "net_kwargs_shipped",
        "num_workers", "max_steps_per_epoch", "samples_per_epoch", "stop_after_epochs", "time_budget_minutes",
        "threads")}
    if args.resume == "auto":
        last = Path(args.out) / "last.pt"
        overrides["resume"] = str(last) if last.exists() else None
        if last.exists():  # the run already started from --init-from's weights (its checkpoints say which)
            overrides["init_from"] = None
    if args.folds is not None and args.fold is None:
        raise CovidsegError("--folds needs --fold I (0-based) to pick the validation fold")
    if overrides["data"] is not None and len(overrides["data"]) == 1:
        overrides["data"] = overrides["data"][0]
    cfg = build_config(args.config, **overrides)
    echo = None if args.quiet else (lambda text: print(text, flush=True))
    code, message = run_training(cfg, echo=echo)
    if code != 0:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _evaluate(args) -> int:
    from .evaluate import evaluate

    data = args.data[0] if len(args.data) == 1 else args.data
    result = evaluate(args.checkpoint, data, args.out, layout=args.layout, split=args.split, subset=args.subset,
                      device=args.device, threshold=args.threshold, phantom_cases=args.phantom_cases,
                      phantom_shape=args.phantom_shape)
    for m in result["mean"]:
        print(f"{m['class']}: Dice {m['dice']:.4f} IoU {m['iou']:.4f} HD95 {m['hd95_mm']:.2f} mm")
    print(f"wrote {result['csv']} and {result['md']}")
    return 0


def _check_data(args) -> int:
    from .datasets import check_data

    data = args.data[0] if len(args.data) == 1 else args.data
    report = check_data(data, args.layout, args.phantom_cases, args.phantom_shape)
    print(json.dumps(report, indent=2))
    return 0


def _recipes(args) -> int:
    from .config import recipes_table

    print(json.dumps(recipes_table(), indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "evaluate": _evaluate, "check-data": _check_data, "recipes": _recipes}[args.command]
    try:
        return int(handler(args) or 0)
    except CovidsegError as exc:
        return _error(exc)
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return _error(f"cannot read or write{where}: {exc.strerror or exc}; check the path, the disk and its permissions")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line, no traceback dump
        print(f"error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (please report this)",
              file=sys.stderr)
        return 1


def _error(message) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
