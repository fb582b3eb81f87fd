"""benchmarks/ensembles.py: probabilities averaged per combination, scored per set, the picks
made on validation only."""

import numpy as np

from benchmarks import ensembles
from training.datasets import Case


def _case(name: str, source: str, infection: np.ndarray) -> Case:
    lung = np.ones_like(infection)
    return Case(name, np.zeros(infection.shape, np.float32), lung, infection, (1.0, 1.0, 1.0), source=source,
                spacing_known=False, domain="display8")


def test_combinations_and_averaged_scores():
    assert len(ensembles.combinations(["a", "b", "c"])) == 7
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, :4] = 1
    sets = {"covid19ctseg": [_case("g1", "covid19ctseg_dstaroff", truth)],
            "infnet": [_case("s1", "covidsemiseg_infnet", truth)]}
    half, other_half = np.zeros((2, 1, 8, 8), np.float16), np.zeros((2, 1, 8, 8), np.float16)
    half[:, 0, :2], other_half[:, 0, 2:4] = 1.0, 1.0  # each finds half of the lesion, with 1.0
    half[1, 0, 4:6] = other_half[1, 0, 6:8] = 1.0  # and one false region the other does not share
    probs = {m: {s: [p] for s in ensembles.SETS} for m, p in (("a", half), ("b", other_half))}
    alone = ensembles.scores(("a",), probs, sets)
    together = ensembles.scores(("a", "b"), probs, sets)
    assert np.isclose(alone["covid19ctseg"], 2 * 16 / (32 + 32))  # 16 true of 32 predicted, 32 real
    # averaged: every voxel is 0.5 at most, so nothing crosses the threshold (> 0.5)
    assert together["covid19ctseg"] == 0.0 and together["criterion"] == 0.0
    assert np.isclose(alone["criterion"], (alone["covid19ctseg"] + alone["infnet"]) / 2)


def test_picks_are_made_among_singles_and_among_combinations():
    validation = {("a",): {"criterion": 0.7}, ("b",): {"criterion": 0.8}, ("a", "b"): {"criterion": 0.75}}
    assert ensembles._best(validation, single=True) == ("b",)
    assert ensembles._best(validation, single=False) == ("a", "b")
