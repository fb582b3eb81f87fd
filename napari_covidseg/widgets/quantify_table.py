"""The Quantify widget's table and its CSV / JSON exports (no Qt here).

Rows are the numbers a radiologist reports, in reading order: severity first (MosMedData CT
grade and the per-lung score), then involvement, volumes, lesions and, for a CT in HU, ground
glass vs consolidation.  Volumes are in mL, or voxel counts where the spacing is a placeholder.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError

# (key in quantify()'s result without its unit suffix, row label, unit) in table order; other
# scalar keys follow.  Volumes ("vol") are in mL, or in voxels where the spacing is a placeholder.
ROWS: Tuple[Tuple[str, str, str], ...] = (
    ("severity_grade", "Severity (MosMedData)", "text"),
    ("lung_score_total", "Lung score (0-10)", "score"),
    ("infection", "Infection volume", "vol"),
    ("lung", "Lung volume", "vol"),
    ("left_involvement_pct", "Left lung involved", "%"),
    ("right_involvement_pct", "Right lung involved", "%"),
    ("total_involvement_pct", "Total involvement", "%"),
    ("n_lesions", "Lesions", ""),
    ("left_lung", "Left lung volume", "vol"),
    ("right_lung", "Right lung volume", "vol"),
    ("left_infection", "Left lung infection", "vol"),
    ("right_infection", "Right lung infection", "vol"),
    ("infection_outside_lung", "Infection outside lung", "vol"),
    ("ground_glass", "Ground glass (< -300 HU)", "vol"),
    ("consolidation", "Consolidation (>= -300 HU)", "vol"),
    ("left_lung_score", "Left lung score (0-5)", "score"),
    ("right_lung_score", "Right lung score (0-5)", "score"),
)
HIDDEN_KEYS = {"voxel_volume_ml", "lung_split_method", "spacing_known", "volume_unit", "min_lesion_ml",
               "min_lesion_voxels"}  # in the exports, not in the table


def _plain(value):
    """JSON/CSV-friendly copy of a quantify() value (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in list(value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def table_rows(result: Dict) -> List[Tuple[str, str]]:
    """(label, text) rows for the table: the known keys first, then any other scalar key."""
    rows, shown = [], set()
    in_ml = result.get("volume_unit", "mL") == "mL"
    for base, label, unit in ROWS:
        key = base + ("_ml" if in_ml else "_voxels") if unit == "vol" else base
        if key not in result:
            continue
        shown.add(key)
        value = result[key]
        if unit == "text":
            text = str(value)
        elif unit == "score" or key == "n_lesions" or (unit == "vol" and not in_ml):
            text = str(int(value)) + (" voxels" if unit == "vol" else "")
        elif value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "n/a"
        else:
            text = f"{float(value):.1f} {'mL' if unit == 'vol' else unit}".strip()
        rows.append((label, text))
    known = shown | HIDDEN_KEYS
    for key, value in result.items():
        if key in known:
            continue
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            rows.append((key.replace("_", " "), f"{float(value):.4g}"))
        elif isinstance(value, (list, tuple, np.ndarray)) and "lesion" in key and len(value):
            largest = sorted((float(v) for v in value), reverse=True)[:3]
            rows.append(("Largest lesions", ", ".join(f"{v:.1f}" if in_ml else f"{v:.0f}" for v in largest)
                         + (" mL" if in_ml else " voxels")))
    return rows


def write_quantify_csv(path, result: Dict, overwrite: bool = False) -> Path:
    """``quantity,value`` rows of every scalar in ``result`` (lists joined with ';')."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another file name (nothing was written).")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["quantity", "value"])
        for key, value in _plain(result).items():
            if isinstance(value, list):
                value = ";".join("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
            elif isinstance(value, float):
                value = f"{value:.6g}"
            writer.writerow([key, "" if value is None else value])
    return path


def write_quantify_json(path, result: Dict, layers: Dict[str, Optional[str]], overwrite: bool = False) -> Path:
    """The whole result (with the layer names it came from) as indented JSON."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another file name (nothing was written).")
    with open(path, "w") as fh:
        json.dump({"layers": layers, "result": _plain(result)}, fh, indent=2)
    return path




def severity_text(result: Dict) -> str:
    """``CT-2: 31.4 % of lung + infection involved (left 12 %, right 45 %)`` for the headline."""
    total = result.get("total_involvement_pct")
    if total is None or not math.isfinite(float(total)):
        return f"{result.get('severity_grade', 'CT-0')}: no lung to measure"
    sides = ", ".join(f"{side} {float(result[f'{side}_involvement_pct']):.0f} %" for side in ("left", "right")
                      if result.get(f"{side}_involvement_pct") is not None
                      and math.isfinite(float(result[f"{side}_involvement_pct"])))
    return (f"{result['severity_grade']}: {float(total):.1f} % of lung + infection involved"
            + (f" ({sides})" if sides else "") + f"; score {result.get('lung_score_total', 0)}/10")
