"""Model cards read every leg of a checkpoint's training (fine-tuning chains) from its record."""

from napari_covidseg.training_history import describe_legs, total_minutes, trained_on, training_legs
from napari_covidseg.weights_catalog import model_card

FIRST = {"device": "cuda", "gpu": "NVIDIA H200", "runs_sharing_gpu": 5, "epochs_trained": 24, "wall_minutes": 5.0,
         "time_budget_minutes": 5.5}
SECOND = {"device": "cuda", "gpu": "NVIDIA H200", "runs_sharing_gpu": 2, "epochs_trained": 17, "wall_minutes": 3.1,
          "initialised_from": {"file": "ms_unet.pt", "training": FIRST}}
THIRD = {"device": "cpu", "cpu_threads": 2, "epochs_done": 3, "wall_minutes": 40.0,
         "initialised_from": {"file": "best.pt", "training": SECOND}}


def test_legs_are_listed_earliest_first_with_their_devices_and_the_total_time():
    assert training_legs(THIRD) == [FIRST, SECOND, THIRD]
    assert total_minutes(THIRD) == 48.1
    assert trained_on(FIRST) == "NVIDIA H200 shared by 5 runs" and trained_on(THIRD) == "cpu (2 threads)"
    assert describe_legs(SECOND) == ("24 epochs in 5.0 min on NVIDIA H200 shared by 5 runs (a 5.5-minute budget), "
                                     "then 17 epochs in 3.1 min on NVIDIA H200 shared by 2 runs")


def test_a_run_from_scratch_or_an_old_checkpoint_is_one_leg():
    assert training_legs(FIRST) == [FIRST]
    assert training_legs({}) == [] and total_minutes({}) is None
    assert describe_legs({"device": "cpu"}) == "? epochs on cpu"


def test_the_gui_card_shows_every_leg_and_the_total():
    details = model_card({"network": "ms_unet", "training": SECOND, "metrics": {}}).details
    line = next(d for d in details if d.startswith("training:"))
    assert "24 epochs in 5.0 min" in line and "then 17 epochs in 3.1 min" in line
    assert line.endswith("8.1 min in all, each leg fine-tuned from the one before")
    assert "epochs: 5 of 17 (the last leg's best)" in model_card(
        {"network": "ms_unet", "training": {**SECOND, "epochs_done": 5, "epochs_planned": 17}, "metrics": {}}).details
    one = next(d for d in model_card({"network": "unet", "training": FIRST, "metrics": {}}).details if d.startswith("training:"))
    assert "in all" not in one


def test_a_malformed_record_still_gives_a_card():
    bad = {"device": "cuda", "runs_sharing_gpu": "five", "wall_minutes": "long", "epochs_trained": [1],
           "time_budget_minutes": {}, "initialised_from": {"training": "not a dict"}}
    assert describe_legs(bad) == "? epochs on a CUDA GPU" and total_minutes(bad) is None
    assert trained_on({"device": "cpu", "cpu_threads": "x"}) == "cpu"
    card = model_card({"network": "unet", "training": {"wall_minutes": 3, "initialised_from": {"training": {"wall_minutes": "?"}}},
                       "metrics": {}})
    assert any(d.startswith("training: ? epochs on ?, then ? epochs in 3.0 min") for d in card.details)
