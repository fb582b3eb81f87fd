"""Case-level splits: slices or patches of one case (or one group of cases) never sit on both sides.

A split is a plain dict ``{"train": [ids], "val": [ids], "test": [ids], "seed", "method", ...}``
written as ``split.json`` next to the checkpoints, so evaluation can use exactly the held-out cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from napari_covidseg.atomic_file import atomic_path
from napari_covidseg.errors import DataFolderError


def _groups(case_ids: Sequence[str], groups: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for cid, g in zip(case_ids, groups if groups is not None else case_ids):
        out.setdefault(g, []).append(cid)
    return out


def make_split(case_ids: Sequence[str], groups: Optional[Sequence[str]] = None, val_fraction: float = 0.2,
               test_fraction: float = 0.0, folds: Optional[int] = None, fold: Optional[int] = None,
               seed: int = 0) -> dict:
    """Split case ids by group, shuffled with ``seed``.

    ``folds``/``fold``: K-fold cross-validation, fold ``fold`` (0-based) is validation.
    Otherwise ``val_fraction`` (and ``test_fraction``) of the groups, at least one group each
    when the fraction is positive, are held out.
    """
    by_group = _groups(case_ids, groups)
    names = sorted(by_group)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n = len(order)
    if n < 2:
        raise DataFolderError(f"only {n} case group(s): at least 2 are needed to train and validate on different cases")
    test: List[str] = []
    if folds is not None:
        if folds < 2 or folds > n:
            raise DataFolderError(f"{folds} folds need between 2 and {n} (the number of case groups) folds")
        if fold is None or not 0 <= fold < folds:
            raise DataFolderError(f"fold must be between 0 and {folds - 1}, not {fold}")
        chunks = np.array_split(np.arange(n), folds)
        val = [order[i] for i in chunks[fold]]
        method = f"{folds}-fold, fold {fold}"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataFolderError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
        n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
        n_val = max(1, int(round(val_fraction * n)))
        if n_val + n_test >= n:
            raise DataFolderError(f"{n} case groups are too few to hold out {n_val} for validation and {n_test} for test")
        test = order[:n_test]
        val = order[n_test:n_test + n_val]
        method = f"holdout val {val_fraction:g}" + (f", test {test_fraction:g}" if n_test else "")
    held = set(val) | set(test)
    train = [g for g in order if g not in held]

    def ids(gs):
        return sorted(cid for g in gs for cid in by_group[g])

    return {"train": ids(train), "val": ids(val), "test": ids(test), "seed": int(seed), "method": method,
            "n_groups": n}


def write_split(split: dict, path) -> Path:
    """Write ``split.json`` atomically (a kill never leaves half a split behind)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(split, indent=2) + "\n")
    return path


def read_split(path) -> dict:
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataFolderError(f"cannot read the split file {path} ({exc}); give the split.json a training run wrote") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k, []), list) for k in ("train", "val", "test")):
        raise DataFolderError(f"{path} is not a split file (expected lists 'train', 'val', 'test')")
    return split
