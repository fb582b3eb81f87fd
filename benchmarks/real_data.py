"""Accuracy of every shipped network on held-out real chest CT of ``../shared/data``.

    python -m benchmarks.real_data                          # every network's shipped weights
    python -m benchmarks.real_data --checkpoint unet=benchmarks/runs/real/unet/best.pt
    python -m benchmarks.real_data --network unet --out /tmp/r   # one network, elsewhere

Test sets (never trained on; the split is ``benchmarks/real_data_split.py``):

* **COVID-19-CT-Seg groups** (Ma et al., dstaroff's 8-bit PNG release): the 4 held-out patient
  groups cc02, cc09, rp01, rp07.  Dice, IoU, sensitivity, specificity, precision and MAE are
  computed per group (all its slices as one volume) and averaged over groups.  Their spacing is a
  placeholder and their z axis is not contiguous (slices without infection were dropped), so
  HD95 is computed per slice in pixels (of the 256 x 256 slices) and averaged over the slices
  where prediction and truth are both non-empty.
* **Inf-Net / MedSeg slices**: the 10 held-out training slices of Inf-Net (seed 2026).  Infection
  only (their lung masks are derived approximations): Dice at threshold 0.5, the other metrics,
  HD95 in pixels, and Inf-Net's own evaluation Dice (``meanDic``, mean over 256 thresholds of the
  min-max-normalised probability map, 0 without a true positive), each averaged over slices.
* **cip_ct64**: the only real CT in Hounsfield units (a COPD scan, no infection, real spacing):
  lung Dice / IoU / HD95 in mm, and the share of the lung volume called infection.
* **Sample phantom** (synthetic, ``make_phantom()``): only to check that the sample still segments;
  it is not an accuracy figure.

Results go to ``benchmarks/results/real_data.{json,md}`` with the papers' own figures beside ours
(different data and splits: they show the scale, they are not a like-for-like comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from napari_covidseg.checkpoint import available_shipped, load_checkpoint, load_shipped
from napari_covidseg.inference import predict_volume
from napari_covidseg.metrics import all_metrics, hd95, infnet_mean_dice
from napari_covidseg.training_history import describe_training, training_legs

from training.datasets import Case, load_sources

from .real_data_split import DSTAROFF, INFNET, SPLIT_PATH
from .train_real_weights import DATA_ROOT

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = ("dice", "iou", "sensitivity", "specificity", "precision", "mae")

# The papers' own figures (SEEDS.md); their data and splits differ from ours.
PAPERS = [
    ("U-Net (in MS-UNet's table)", "COVID-19-CT100 (MedSeg 50/50 slices)", "infection Dice 0.741"),
    ("MS-UNet", "COVID-19-CT100 (MedSeg 50/50 slices)", "infection Dice 0.794, HD 33.43"),
    ("MSA-CPP U-Net", "MedSeg + MosMed, 2629 slices, 8:1:1", "infection precision 0.872, recall 0.846, IoU 0.760"),
    ("QC-HC U-Net", "COVID-19-CT-Seg, 20 volumes 80/20", "infection Dice 0.853, lung Dice 0.986"),
    ("CHS-Net", "MedSeg + COVID-19-CT-Seg, 3560 slices 70/30", "infection Dice 0.88, lung Dice 0.96"),
    ("Semi-Inf-Net", "Inf-Net test slices (MedSeg)", "infection Dice@0.5 0.770, meanDic 0.739"),
    ("U-Net (in Inf-Net's table)", "Inf-Net test slices (MedSeg)", "infection Dice@0.5 0.541, meanDic 0.439"),
]


def test_cases(root: Path = DATA_ROOT) -> Dict[str, List[Case]]:
    """The held-out cases of each test set, read as training reads them."""
    return split_cases(("test",), root, with_cip_ct64=True)["test"]


def split_cases(parts: Sequence[str], root: Path = DATA_ROOT,
                with_cip_ct64: bool = False) -> Dict[str, Dict[str, List[Case]]]:
    """Per part of the split (``"val"``, ``"test"``), its cases per set, read once as training reads them."""
    split = json.loads(SPLIT_PATH.read_text())
    sources = [str(root / DSTAROFF), f"{root / INFNET},labels=infection"]
    _, _, cases = load_sources(sources + ([str(root / "cip_ct64")] if with_cip_ct64 else []))
    by_id = {c.case_id: c for c in cases}
    out = {}
    for part in parts:
        out[part] = {
            "covid19ctseg": [by_id[i] for i in split[part] if i.startswith(DSTAROFF + "/")],
            "infnet": [by_id[i] for i in split[part] if i.startswith(INFNET + "/")],
        }
        if with_cip_ct64:
            out[part]["cip_ct64"] = [c for c in cases if c.source == "cip_ct64"]
    return out


def slice_hd95_px(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean over slices (both masks non-empty) of the 2D HD95 in pixels; NaN if there is none."""
    values = [hd95(p, g, (1.0, 1.0)) for p, g in zip(pred, gt) if p.any() and g.any()]
    return float(np.mean(values)) if values else float("nan")


def case_scores(prob: np.ndarray, case: Case) -> Dict[str, dict]:
    """Per-class metrics of one case (HD95 per slice in px where the spacing is a placeholder)."""
    out = {}
    for c, (name, gt) in enumerate((("lung", case.lung), ("infection", case.infection))):
        if gt is None:
            continue
        pred = prob[c] > 0.5
        m = all_metrics(pred, gt, spacing=case.spacing, prob=prob[c], with_hd95=case.spacing_known)
        m = {k: m[k] for k in RATIOS + (("hd95_mm",) if case.spacing_known else ())}
        if not case.spacing_known:
            m["hd95_px"] = slice_hd95_px(pred, gt > 0)
        if case.source.startswith(INFNET):
            m["infnet_mean_dice"] = infnet_mean_dice(prob[c][0], gt[0])
        out[name] = m
    if case.source == "cip_ct64":
        lung = case.lung > 0
        out["infection_share_of_lung_pct"] = 100.0 * float(np.count_nonzero((prob[1] > 0.5) & lung)) / max(1, int(lung.sum()))
    return out


def mean_scores(per_case: List[dict]) -> dict:
    """Mean of every metric over cases (NaN values left out), per class."""
    out = {}
    for cls in ("lung", "infection"):
        items = [s[cls] for s in per_case if cls in s]
        if items:
            keys = sorted({k for m in items for k in m})
            out[cls] = {k: _nanmean([m.get(k) for m in items]) for k in keys}
    shares = [s["infection_share_of_lung_pct"] for s in per_case if "infection_share_of_lung_pct" in s]
    if shares:
        out["infection_share_of_lung_pct"] = float(np.mean(shares))
    return out


def _nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_network(loaded, sets: Dict[str, List[Case]], device: str = "auto") -> dict:
    """Scores of one network on every test set, plus the sample phantom."""
    from napari_covidseg.phantom import make_phantom

    result = {"network": loaded.network, "weights": loaded.path, "sets": {}}
    t0 = time.perf_counter()
    for set_name, cases in sets.items():
        per_case = {}
        for case in cases:
            prob = predict_volume(loaded.model, loaded.spec, case.ct, case.spacing, loaded.preprocessing,
                                  device=device, domain=case.domain)
            per_case[case.case_id] = case_scores(prob, case)
        result["sets"][set_name] = {"mean": mean_scores(list(per_case.values())), "cases": per_case}
    sample = make_phantom()
    prob = predict_volume(loaded.model, loaded.spec, sample.ct, sample.spacing, loaded.preprocessing, device=device)
    result["sample_phantom"] = {"lung_dice": all_metrics(prob[0] > 0.5, sample.lung, with_hd95=False)["dice"],
                                "infection_dice": all_metrics(prob[1] > 0.5, sample.infection, with_hd95=False)["dice"]}
    result["seconds"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _set_rows(results: dict, set_name: str, columns) -> List[List[str]]:
    rows = []
    for name, r in results.items():
        mean = r["sets"].get(set_name, {}).get("mean", {})
        rows.append([f"`{name}`"] + [_f((mean.get(cls) or {}).get(key), 1 if "hd95" in key else 3) for cls, key in columns])
    return rows


def targets(results: dict) -> List[str]:
    """The issue's targets, each with the measured value and whether it is met."""
    def get(name, set_name, cls, key):
        return ((results[name]["sets"].get(set_name, {}).get("mean", {}).get(cls)) or {}).get(key, float("nan"))

    names = list(results)
    best_inf = max(names, key=lambda n: get(n, "covid19ctseg", "infection", "dice"))
    best_lung = max(names, key=lambda n: get(n, "covid19ctseg", "lung", "dice"))
    best_infnet = max(names, key=lambda n: get(n, "infnet", "infection", "dice"))
    lines = []

    def check(text, value, ok):
        lines.append(f"- {'met' if ok else '**not met**'}: {text}: {value}")

    check("COVID-19-CT-Seg groups, best lung Dice >= 0.97", f"{get(best_lung, 'covid19ctseg', 'lung', 'dice'):.3f} (`{best_lung}`)",
          get(best_lung, "covid19ctseg", "lung", "dice") >= 0.97)
    check("COVID-19-CT-Seg groups, best infection Dice >= 0.80", f"{get(best_inf, 'covid19ctseg', 'infection', 'dice'):.3f} (`{best_inf}`)",
          get(best_inf, "covid19ctseg", "infection", "dice") >= 0.80)
    worst = min(names, key=lambda n: get(n, "covid19ctseg", "lung", "dice"))
    check("every network's lung Dice >= 0.95", f"lowest {get(worst, 'covid19ctseg', 'lung', 'dice'):.3f} (`{worst}`)",
          get(worst, "covid19ctseg", "lung", "dice") >= 0.95)
    check("Inf-Net slices, best infection Dice@0.5 >= 0.77", f"{get(best_infnet, 'infnet', 'infection', 'dice'):.3f} (`{best_infnet}`)",
          get(best_infnet, "infnet", "infection", "dice") >= 0.77)
    best_md = max(names, key=lambda n: get(n, "infnet", "infection", "infnet_mean_dice"))
    check("Inf-Net slices, best meanDic >= 0.74", f"{get(best_md, 'infnet', 'infection', 'infnet_mean_dice'):.3f} (`{best_md}`)",
          get(best_md, "infnet", "infection", "infnet_mean_dice") >= 0.74)
    if "unet" in results:
        beat = [n for n in names if n != "unet" and get(n, "covid19ctseg", "infection", "dice") > get("unet", "covid19ctseg", "infection", "dice")]
        check("a paper network beats the plain U-Net on COVID-19-CT-Seg infection Dice",
              ", ".join(f"`{n}`" for n in beat) or "none", bool(beat))
    for n in names:
        cip = results[n]["sets"].get("cip_ct64", {}).get("mean", {})
        check(f"`{n}` on cip_ct64: lung Dice >= 0.95 and < 1 % of the lung called infection",
              f"{_f((cip.get('lung') or {}).get('dice'))}, {_f(cip.get('infection_share_of_lung_pct'), 2)} %",
              (cip.get("lung") or {}).get("dice", 0) >= 0.95 and cip.get("infection_share_of_lung_pct", 100) < 1.0)
        check(f"`{n}` sample phantom lung Dice >= 0.95", _f(results[n]["sample_phantom"]["lung_dice"]),
              results[n]["sample_phantom"]["lung_dice"] >= 0.95)
    return lines


def _changed_for(t: dict) -> str:
    return {"gpu": "for a GPU lent for minutes", "full": "(none: the full recipe)"}.get(t.get("run_recipe"), "for the 2-core CPU")


def model_card(name: str, r: dict) -> List[str]:
    """A short card: what the shipped weights were trained on, how, how long, and how good on held-out data."""
    from napari_covidseg.models.registry import get_network
    from napari_covidseg.preprocessing import Preprocessing

    t = r.get("training") or {}
    recipe = t.get("recipe") or {}
    spec = get_network(name)
    sets = r["sets"]
    ct, inf = sets["covid19ctseg"]["mean"], sets["infnet"]["mean"].get("infection") or {}
    cip = sets["cip_ct64"]["mean"]
    data = " + ".join(Path(str(d).split(",")[0]).name for d in (t.get("data") or [])) or "?"
    lines = [f"#### `{name}`: {spec.title}", "",
             f"- Paper: {spec.paper}.",
             f"- Data: {data}; split: {(t.get('split') or {}).get('method', '?')}; {t.get('n_train', '?')} training and "
             f"{t.get('n_val', '?')} validation cases ({', '.join(f'{k}: {v}' for k, v in (t.get('domains') or {}).items())}).",
             f"- Reads: {Preprocessing.from_dict(r.get('preprocessing') or {}).describe_domains()}." if r.get("preprocessing") else "",
             f"- HU -> 8-bit mapping: the run began with the COVID-19-CT-Seg PNG recipe (min-max + CLAHE) and continued "
             f"with the lung window after epoch {t['hu_mapping_switched_after_epoch']}."
             if t.get("hu_mapping_switched_after_epoch") else "",
             f"- Recipe: {recipe.get('optimizer', '?')}, lr {recipe.get('lr', '?')}, {recipe.get('schedule', '?')} schedule, "
             f"batch {recipe.get('batch_size', '?')}, input {recipe.get('input_size', '?')}"
             + (f", random {recipe['crop_size']} crops" if recipe.get("crop_size") else "")
             + f"; the exported checkpoint is epoch {t.get('epochs_done', '?')} of its run (best validation mean Dice).",
             f"- Training: {describe_training(t)}"
             + (" (each a warm restart of the schedule)." if len(training_legs(t)) > 1 else "."),
             f"- Changed from the paper {_changed_for(t)}: {json.dumps(t.get('deviations_from_paper') or {})}; "
             f"shipped width {json.dumps(spec.shipped_kwargs)}; augmentation {', '.join(recipe.get('augmentation') or [])}.",
             f"- Held-out COVID-19-CT-Seg groups: lung Dice {_f((ct.get('lung') or {}).get('dice'))}, infection Dice "
             f"{_f((ct.get('infection') or {}).get('dice'))}; Inf-Net slices: infection Dice {_f(inf.get('dice'))}, meanDic "
             f"{_f(inf.get('infnet_mean_dice'))}; cip_ct64 (HU): lung Dice {_f((cip.get('lung') or {}).get('dice'))}, "
             f"{_f(cip.get('infection_share_of_lung_pct'), 2)} % of the lung called infection.", ""]
    return [line for line in lines if line != ""] + [""]


def write_report(results: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Accuracy on held-out real chest CT (`python -m benchmarks.real_data`)", "",
             "Fixed patient-group split (`benchmarks/real_data_split.py`); none of these cases was trained on. "
             "HD95 is in pixels where the spacing is a placeholder (8-bit sets), in mm on cip_ct64.", "",
             "## COVID-19-CT-Seg, 4 held-out patient groups (cc02, cc09, rp01, rp07; 382 slices), mean over groups", ""]
    cols = [("lung", "dice"), ("lung", "iou"), ("lung", "hd95_px"), ("infection", "dice"), ("infection", "iou"),
            ("infection", "sensitivity"), ("infection", "specificity"), ("infection", "precision"),
            ("infection", "hd95_px"), ("infection", "mae")]
    lines += _table(["network", "lung Dice", "lung IoU", "lung HD95 px", "inf. Dice", "inf. IoU", "inf. sens.", "inf. spec.",
                     "inf. prec.", "inf. HD95 px", "inf. MAE"], _set_rows(results, "covid19ctseg", cols))
    lines += ["", "## Inf-Net / MedSeg, 10 held-out slices, mean over slices (infection)", ""]
    cols = [("infection", k) for k in ("dice", "infnet_mean_dice", "iou", "sensitivity", "specificity", "precision", "hd95_px", "mae")]
    lines += _table(["network", "Dice@0.5", "meanDic (Inf-Net)", "IoU", "sens.", "spec.", "prec.", "HD95 px", "MAE"],
                    _set_rows(results, "infnet", cols))
    lines += ["", "## cip_ct64: real CT in HU (COPD, no infection), real spacing", ""]
    lines += _table(["network", "lung Dice", "lung IoU", "lung HD95 mm", "lung called infection (%)"],
                    [[f"`{n}`"] + [_f((r["sets"]["cip_ct64"]["mean"].get("lung") or {}).get(k), 1 if "hd95" in k else 3)
                                   for k in ("dice", "iou", "hd95_mm")]
                     + [_f(r["sets"]["cip_ct64"]["mean"].get("infection_share_of_lung_pct"), 2)] for n, r in results.items()])
    lines += ["", "## Sample phantom (synthetic; a sanity check, not accuracy)", ""]
    lines += _table(["network", "lung Dice", "infection Dice"],
                    [[f"`{n}`", _f(r["sample_phantom"]["lung_dice"]), _f(r["sample_phantom"]["infection_dice"])] for n, r in results.items()])
    lines += ["", "## Targets (issue 9)", ""] + targets(results)
    lines += ["", "## Model cards of the weights evaluated", ""]
    for name, r in results.items():
        lines += model_card(name, r)
    lines += ["", "## The papers' own figures (their data and splits, not ours)", ""]
    lines += _table(["paper", "data", "reported"], [list(p) for p in PAPERS])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out.with_suffix(".md")


def store_test_figures(name: str, result: dict) -> None:
    """Write the held-out COVID-19-CT-Seg figures into the shipped weights' metrics (the weights
    themselves are unchanged), so the GUI's model card shows them."""
    from napari_covidseg.checkpoint import save_checkpoint, shipped_checkpoint_path

    path = shipped_checkpoint_path(name)
    loaded = load_checkpoint(path, expected_network=name)
    mean = result["sets"]["covid19ctseg"]["mean"]
    metrics = dict(loaded.metrics or {})
    metrics["test"] = {cls: {k: mean[cls][k] for k in ("dice", "iou", "sensitivity", "specificity")} for cls in ("lung", "infection")}
    metrics["test_set"] = "4 held-out COVID-19-CT-Seg patient groups"
    metrics["infnet_test"] = result["sets"]["infnet"]["mean"].get("infection")
    save_checkpoint(path, loaded.model, name, loaded.network_kwargs, loaded.preprocessing, training=loaded.training,
                    metrics=metrics, half=True)


def _loaded(name: str, checkpoints: Dict[str, str]):
    return load_checkpoint(checkpoints[name], expected_network=name) if name in checkpoints else load_shipped(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", action="append", help="only these networks (default: every shipped one)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NET=PATH", help="evaluate this file for NET")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_data", help="report path without suffix")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store-in-weights", action="store_true", help="write the test figures into the shipped weights")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown report from its JSON, evaluating nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        print(f"wrote {write_report(json.loads(args.out.with_suffix('.json').read_text()), args.out)}")
        return 0
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    names = args.network or list(dict.fromkeys(available_shipped() + list(checkpoints)))
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    sets = test_cases()
    for name in names:
        loaded = _loaded(name, checkpoints)
        result = evaluate_network(loaded, sets, args.device)
        result["training"] = dict(loaded.training or {})
        result["preprocessing"] = loaded.preprocessing.to_dict()
        previous[name] = result
        if args.store_in_weights and name not in checkpoints:
            store_test_figures(name, result)
        print(f"{name}: " + json.dumps({s: v["mean"] for s, v in result["sets"].items()})[:400], flush=True)
    print(f"wrote {write_report(previous, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
