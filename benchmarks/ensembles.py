"""Would averaging the shipped networks' probabilities beat the best single network?  Chosen on
the validation cases, read on the held-out ones.

    python -m benchmarks.ensembles [--networks unet ms_unet ...]

Every combination of the networks (each alone, and every set of two or more, probabilities
averaged before the 0.5 threshold) is scored on the validation cases of
``benchmarks/real_data_split.json`` (2 COVID-19-CT-Seg groups, 5 Inf-Net slices; the cases the
shipping rule reads).  The criterion is the mean of the two sets' infection Dice (CT-Seg: mean
over groups).  The best combination and the best single network by that criterion are then
scored on the held-out cases (4 CT-Seg groups, 10 Inf-Net slices), once each: the test cases
choose nothing.  Results: ``benchmarks/results/ensembles.md``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from napari_covidseg.checkpoint import available_shipped, load_shipped
from napari_covidseg.inference import predict_volume

from .real_data import RESULTS, case_scores, mean_scores, split_cases

SETS = ("covid19ctseg", "infnet")


def probabilities(networks: Sequence[str], sets) -> Dict[str, Dict[str, list]]:
    """network -> set -> float16 probabilities per case."""
    out = {}
    for name in networks:
        loaded = load_shipped(name)
        out[name] = {s: [predict_volume(loaded.model, loaded.spec, c.ct, c.spacing, loaded.preprocessing,
                                        dtype=np.float16, domain=c.domain) for c in sets[s]] for s in SETS}
    return out


def scores(members: Tuple[str, ...], probs, sets) -> dict:
    """Mean infection Dice per set (and Inf-Net's meanDic) of the averaged probabilities."""
    out = {}
    for s in SETS:
        per_case = [case_scores(np.mean([probs[m][s][i].astype(np.float32) for m in members], axis=0), case)
                    for i, case in enumerate(sets[s])]
        infection = mean_scores(per_case)["infection"]
        out[s] = infection["dice"]
        if s == "infnet":
            out["infnet_mean_dice"] = infection["infnet_mean_dice"]
    out["criterion"] = (out["covid19ctseg"] + out["infnet"]) / 2
    return out


def combinations(networks: Sequence[str]) -> List[Tuple[str, ...]]:
    return [c for r in range(1, len(networks) + 1) for c in itertools.combinations(networks, r)]


def _best(validation: dict, single: bool) -> Tuple[str, ...]:
    """The single network, or the combination of several, with the highest validation criterion."""
    return max((m for m in validation if (len(m) == 1) == single), key=lambda m: validation[m]["criterion"])


def _row(members, s: dict, label: str = "") -> str:
    return (f"| {' + '.join(members)}{label} | {s['covid19ctseg']:.3f} | {s['infnet']:.3f} | {s['infnet_mean_dice']:.3f} | "
            f"{s['criterion']:.3f} |")


def report(validation: dict, picks: Dict[str, Tuple[str, ...]], test: dict, minutes: float) -> str:
    header = ["| networks (probabilities averaged) | CT-Seg infection Dice | Inf-Net Dice@0.5 | Inf-Net meanDic | criterion |",
              "|---|---|---|---|---|"]
    ranked = sorted(validation.items(), key=lambda kv: -kv[1]["criterion"])
    lines = ["# Ensembles of the shipped networks (`python -m benchmarks.ensembles`)", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.0f} min on the CPU.", "",
             "## Held-out cases: the validation's picks", "", *header]
    lines += [_row(picks[k], test[k], f" ({k} on validation)") for k in ("best single network", "best combination")]
    lines += ["", "## Validation cases: every combination, best first", "", *header]
    lines += [_row(members, s) for members, s in ranked]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensembles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=None, help="default: every shipped network")
    parser.add_argument("--out", default=str(RESULTS / "ensembles.md"))
    args = parser.parse_args(argv)
    networks = args.networks or available_shipped()
    t0 = time.perf_counter()
    parts = split_cases(("val", "test"))
    val_sets, test_sets = parts["val"], parts["test"]
    val_probs = probabilities(networks, val_sets)
    validation = {m: scores(m, val_probs, val_sets) for m in combinations(networks)}
    del val_probs
    picks = {"best single network": _best(validation, single=True), "best combination": _best(validation, single=False)}
    test_probs = probabilities(sorted(set().union(*picks.values())), test_sets)
    test = {k: scores(m, test_probs, test_sets) for k, m in picks.items()}
    Path(args.out).write_text(report(validation, picks, test, (time.perf_counter() - t0) / 60))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
