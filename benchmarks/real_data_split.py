"""The fixed patient-group split of ``../shared/data`` used to train the shipped weights and to
report their accuracy (``python -m benchmarks.real_data_split`` rewrites ``real_data_split.json``).

* COVID-19-CT-Seg (dstaroff groups, 14 patient groups): test = cc02, cc09, rp01, rp07 (382 slices,
  2 coronacases + 2 Radiopaedia patients); validation (checkpoint choice only) = cc05, rp05
  (140 slices); training = the other 8 groups (757 slices).  Groups, not slices, are split, so
  no patient is on two sides.  The project's own evaluation groups (cc06, cc10, rp02, rp03) are
  not in ``../shared/data`` at all.
* Inf-Net / MedSeg training slices (50 single-slice cases, no patient ids): 10 test and 5
  validation slices drawn with seed 2026, 35 for training.  MedSeg publishes no patient ids,
  so neighbouring slices of one patient may sit on both sides (as in Inf-Net's own split).
* Phantoms (synthetic, HU): seeds 0..5 (with lesions) and 7..10 (healthy) train, seeds 6 and 11
  validation; never used for reported accuracy.
* ``cip_ct64`` (the only real HU CT) is not trained on: it is a test case only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLIT_PATH = Path(__file__).resolve().parent / "real_data_split.json"
DSTAROFF, INFNET, PHANTOM = "covid19ctseg_dstaroff", "covidsemiseg_infnet", "phantom"
DSTAROFF_TEST = ("cc02", "cc09", "rp01", "rp07")
DSTAROFF_VAL = ("cc05", "rp05")
DSTAROFF_ALL = ("cc01", "cc02", "cc03", "cc04", "cc05", "cc07", "cc08", "cc09",
                "rp01", "rp04", "rp05", "rp06", "rp07", "rp08")
INFNET_IDS = tuple(str(i) for i in [*range(0, 6), *range(10, 18), 19, 20, *range(23, 36), 37, *range(39, 48),
                                    *range(49, 59), 67])
INFNET_SEED, INFNET_TEST, INFNET_VAL = 2026, 10, 5
PHANTOM_TRAIN = ["phantom_000", "phantom_001", "phantom_002", "phantom_003", "phantom_004", "phantom_005",
                 "phantom_007_healthy", "phantom_008_healthy", "phantom_009_healthy", "phantom_010_healthy"]
PHANTOM_VAL = ["phantom_006", "phantom_011_healthy"]


def build_split() -> dict:
    order = [INFNET_IDS[i] for i in np.random.default_rng(INFNET_SEED).permutation(len(INFNET_IDS))]
    inf_test, inf_val, inf_train = order[:INFNET_TEST], order[INFNET_TEST:INFNET_TEST + INFNET_VAL], order[INFNET_TEST + INFNET_VAL:]

    def ids(source, names):
        return sorted(f"{source}/{n}" for n in names)

    dst_train = [g for g in DSTAROFF_ALL if g not in DSTAROFF_TEST + DSTAROFF_VAL]
    return {
        "train": ids(DSTAROFF, dst_train) + ids(INFNET, inf_train) + ids(PHANTOM, PHANTOM_TRAIN),
        "val": ids(DSTAROFF, DSTAROFF_VAL) + ids(INFNET, inf_val) + ids(PHANTOM, PHANTOM_VAL),
        "test": ids(DSTAROFF, DSTAROFF_TEST) + ids(INFNET, inf_test),
        "seed": INFNET_SEED,
        "method": "fixed patient-group split of ../shared/data (benchmarks/real_data_split.py)",
    }


def main() -> None:
    SPLIT_PATH.write_text(json.dumps(build_split(), indent=2) + "\n")
    print(f"wrote {SPLIT_PATH}")


if __name__ == "__main__":
    main()
