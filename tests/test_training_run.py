"""Short CPU training runs on tiny phantoms: learning, checkpoints, logs, resume, evaluate."""

import csv
import json
from pathlib import Path

import pytest
import torch

from napari_covidseg.checkpoint import load_checkpoint
from training.cli import main
from training.evaluate import CSV_COLUMNS

TINY = ["--data", "phantom", "--phantom-cases", "4", "--phantom-shape", "16", "96", "96", "--device", "cpu",
        "--threads", "1", "--quiet", "--network", "unet"]


def _records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    code = main(["train", *TINY, "--out", str(out), "--epochs", "4", "--input-size", "96", "96", "--batch-size", "8",
                 "--slices-per-epoch", "96", "--network-kwargs", '{"base": 8}'])
    assert code == 0
    return out


def test_training_improves_validation_dice_and_writes_the_run_folder(trained_run):
    out = trained_run
    for name in ("last.pt", "best.pt", "split.json", "config.json", "metrics.jsonl", "train.log"):
        assert (out / name).is_file(), name
    records = _records(out)
    assert records[0]["event"] == "start" and records[0]["network"] == "unet" and records[0]["epochs"] == 4
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    for r in epochs:
        assert set(r["val"]) == {"lung", "infection"}
        assert set(r["val"]["lung"]) == {"dice", "iou", "sensitivity", "specificity"}
        for key in ("train_loss", "val_loss", "val_dice_mean", "lr", "seconds", "throughput", "device"):
            assert key in r
    assert records[-1] == {**records[-1], "event": "end", "status": "finished", "error": None}
    # the untrained network's Dice is near 0 for the lung; four epochs bring it up by a clear margin (this
    # seeded CPU run goes from 0.006 to 0.49 in the mean and to 0.97 in the lung): both must hold
    best = max(r["val_dice_mean"] for r in epochs)
    assert epochs[0]["val"]["lung"]["dice"] < 0.2
    assert best - epochs[0]["val_dice_mean"] > 0.3
    assert max(r["val"]["lung"]["dice"] for r in epochs) > 0.8
    split = json.loads((out / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["val"]) and len(split["train"]) + len(split["val"]) == 4
    loaded = load_checkpoint(out / "best.pt", expected_network="unet")
    assert loaded.preprocessing.inplane_size == (96, 96)  # trained size, so inference resizes the same way
    assert loaded.network_kwargs == {"base": 8}
    assert loaded.training["split"]["val"] == split["val"]


def test_evaluate_writes_csv_and_markdown(trained_run, tmp_path):
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", "phantom", "--phantom-cases", "4",
                 "--phantom-shape", "16", "96", "96", "--split", str(trained_run / "split.json"), "--subset", "val",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    val = json.loads((trained_run / "split.json").read_text())["val"]
    assert {r["case"] for r in rows} == set(val) | {"mean"}
    assert {r["class"] for r in rows} == {"lung", "infection"}
    lung_mean = next(r for r in rows if r["case"] == "mean" and r["class"] == "lung")
    assert float(lung_mean["dice"]) > 0.7 and float(lung_mean["hd95_mm"]) >= 0
    md = (out / "metrics.md").read_text()
    assert "| case | class | Dice | IoU | Sensitivity | Specificity | Precision | F-measure | HD95 (mm) | MAE |" in md


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    common = [*TINY, "--epochs", "2", "--input-size", "64", "64", "--batch-size", "4", "--slices-per-epoch", "12",
              "--network-kwargs", '{"base": 4, "depth": 2}', "--augmentation", "flip", "rotate", "gamma", "noise"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *common, "--out", str(full)]) == 0
    assert main(["train", *common, "--out", str(part), "--stop-after-epochs", "1"]) == 0
    assert _records(part)[-1]["status"] == "stopped"
    assert main(["train", *common, "--out", str(part), "--resume", "auto"]) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["extra"]["epoch"] == b["extra"]["epoch"] == 2
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    ep_full = [r for r in _records(full) if r["event"] == "epoch"][-1]
    ep_part = [r for r in _records(part) if r["event"] == "epoch"][-1]
    assert ep_full["train_loss"] == ep_part["train_loss"] and ep_full["lr"] == ep_part["lr"]


def test_user_errors_end_the_log_with_failed_and_exit_non_zero(tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["train", *TINY, "--out", str(out), "--epochs", "1", "--resume", str(tmp_path / "missing.pt")])
    assert code != 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    end = _records(out)[-1]
    assert end["event"] == "end" and end["status"] == "failed" and "does not exist" in end["error"]


def test_config_file_overrides_recipe_and_flags_override_config(tmp_path):
    from training.config import build_config

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 0.05, "epochs": 7, "schedule": "cosine"}))
    cfg = build_config(str(cfg_file), network="msa_cpp_unet", epochs=3)
    assert (cfg.lr, cfg.epochs, cfg.schedule, cfg.optimizer) == (0.05, 3, "cosine", "rmsprop")
    cfg_file.write_text(json.dumps({"learning_rate": 1}))
    from napari_covidseg.errors import InputError

    with pytest.raises(InputError, match="unknown field"):
        build_config(str(cfg_file), network="unet")


def test_3d_network_trains_on_patches_with_one_target(tmp_path):
    out = tmp_path / "qchc"
    code = main(["train", "--network", "qchc_unet3d", "--data", "phantom", "--phantom-cases", "3", "--phantom-shape", "16", "48", "48",
                 "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out), "--epochs", "1", "--input-size", "16", "32", "32",
                 "--target-spacing", "15", "7.5", "7.5", "--batch-size", "2", "--slices-per-epoch", "2",
                 "--network-kwargs", '{"base": 4}', "--target", "lung"])
    assert code == 0
    loaded = load_checkpoint(out / "last.pt", expected_network="qchc_unet3d")
    assert loaded.preprocessing.target_spacing == (15.0, 7.5, 7.5) and loaded.preprocessing.normalisation == "zscore"
    epoch = [r for r in _records(out) if r["event"] == "epoch"][0]
    assert epoch["val_dice_mean"] == epoch["val"]["lung"]["dice"]  # only the chosen class counts


def test_step_records_show_progress_within_an_epoch(tmp_path, monkeypatch):
    """The Train widget's within-epoch bar reads these: step s of n, in order, never past n."""
    import json

    from training import trainer
    from training.config import build_config

    monkeypatch.setattr(trainer, "STEP_RECORD_SECONDS", 0.0)
    cfg = build_config(None, network="unet", data="phantom", phantom_cases=2, phantom_shape=[4, 32, 32], out=str(tmp_path),
                       epochs=1, batch_size=1, input_size=[32, 32], samples_per_epoch=3, network_kwargs={"base": 4})
    assert trainer.run_training(cfg)[0] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and {r["steps"] for r in steps} == {3}
    assert all(r["epoch"] == 1 and r["train_loss"] > 0 for r in steps)
    assert [r["event"] for r in records].index("epoch") > [r["event"] for r in records].index("step")


def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path, monkeypatch):
    """val_every = 2 over 5 epochs: validation after epochs 2, 4 and 5 (the last) only; best.pt is
    written at validated epochs only, and is the best of them."""
    from training import trainer
    from training.config import build_config

    calls = []
    real_validate = trainer.validate
    scores = iter([0.2, 0.6, 0.4])  # the Dice each validation reports: best at epoch 4

    def counting_validate(*args, **kwargs):
        summary, _, val_loss, by_source = real_validate(*args, **kwargs)
        calls.append(1)
        return summary, next(scores), val_loss, by_source

    saved = []
    real_save = trainer.Trainer._save
    monkeypatch.setattr(trainer, "validate", counting_validate)
    monkeypatch.setattr(trainer.Trainer, "_save", lambda self, path, epoch, *a, **k: saved.append((Path(path).name, epoch))
                        or real_save(self, path, epoch, *a, **k))
    cfg = build_config(None, network="unet", data="phantom", phantom_cases=2, phantom_shape=[4, 32, 32], out=str(tmp_path),
                       epochs=5, batch_size=2, input_size=[32, 32], samples_per_epoch=2, network_kwargs={"base": 4},
                       val_every=2)
    assert trainer.run_training(cfg)[0] == 0
    epochs = [r for r in _records(tmp_path) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5] and len(calls) == 3
    assert [r["epoch"] for r in epochs if "val" in r] == [2, 4, 5]
    assert [r["val_dice_mean"] for r in epochs if "val" in r] == [0.2, 0.6, 0.4]
    assert [epoch for name, epoch in saved if name == "best.pt"] == [2, 4]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["epoch"] == 4 and best["metrics"]["val_dice_mean"] == 0.6
    assert _records(tmp_path)[-1]["best_val_dice_mean"] == 0.6


class _Clock:
    """A stand-in for the trainer's ``time`` module: training and validation advance it by set amounts."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def _budgeted_run(tmp_path, monkeypatch, train_seconds, epochs=20, val_every=2, budget=1.0):
    """A tiny run whose epochs 'take' ``train_seconds[i]`` (then the last value) and each validation 4 s."""
    from training import trainer
    from training.config import build_config

    clock = _Clock()
    monkeypatch.setattr(trainer, "time", clock)
    real_epoch, real_validate = trainer.Trainer._train_epoch, trainer.validate
    durations = iter(train_seconds)
    last = [train_seconds[-1]]

    def timed_epoch(self, *args):
        start = clock.now
        done = real_epoch(self, *args)
        clock.now = start + next(durations, last[0])
        self.last_train_seconds = clock.now - start
        return done

    def timed_validate(*args, **kwargs):
        clock.now += 4.0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "_train_epoch", timed_epoch)
    monkeypatch.setattr(trainer, "validate", timed_validate)
    cfg = build_config(None, network="unet", data="phantom", phantom_cases=2, phantom_shape=[4, 32, 32], out=str(tmp_path),
                       epochs=epochs, batch_size=2, input_size=[32, 32], samples_per_epoch=2, network_kwargs={"base": 4},
                       val_every=val_every, time_budget_minutes=budget, schedule="poly", lr=1e-3)
    code, status = trainer.run_training(cfg)
    return code, status, _records(tmp_path)


def test_time_budget_fits_the_planned_epochs_after_the_first_and_the_poly_schedule_still_ends(tmp_path, monkeypatch):
    """60 s budget, 10 s per epoch, 4 s per validation every 2nd epoch: the first epoch is validated
    (14 s), so 12 s per epoch on average fit 3 more (with one last validation): 4 epochs instead of 20,
    and the learning rate falls along a 4-epoch poly schedule."""
    code, status, records = _budgeted_run(tmp_path, monkeypatch, [10.0])
    assert code == 0 and records[-1]["status"] == "finished"
    budget = [r for r in records if r["event"] == "budget"]
    assert len(budget) == 1 and budget[0]["planned_epochs"] == 20 and budget[0]["epochs"] == 4
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["epoch"] for r in epochs if "val" in r] == [1, 2, 4]  # the probe, every 2nd, the last
    assert [r["lr"] for r in epochs] == pytest.approx([1e-3 * (1 - e / 4) ** 0.9 for e in range(4)])
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 4
    assert torch.load(tmp_path / "last.pt", weights_only=True)["extra"]["config"]["epochs"] == 4


def test_time_budget_is_refitted_when_epochs_slow_down_and_the_run_still_ends_validated(tmp_path, monkeypatch):
    """The first epoch takes 10 s (4 epochs fit), the next ones 30 s: after epoch 2 (48 s, validated) no
    32 s epoch fits any more, so the plan becomes 2 epochs and the run ends there, finished, validated."""
    code, status, records = _budgeted_run(tmp_path, monkeypatch, [10.0, 30.0])
    assert code == 0 and status == "finished" and records[-1]["status"] == "finished"
    assert [(r["after_epoch"], r["epochs"]) for r in records if r["event"] == "budget"] == [(1, 4), (2, 2)]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and "val" in epochs[-1]
    assert (tmp_path / "best.pt").is_file()


def test_time_budget_raises_a_plan_that_a_slow_first_epoch_lowered_but_never_above_the_first_plan(tmp_path, monkeypatch):
    """2 min: a slow first epoch (start-up, autotuning: 40 s, +4 s validation) fits 1 more; then 9 s epochs fit 7 more, and a
    plan of 6 epochs caps it at 6."""
    code, status, records = _budgeted_run(tmp_path, monkeypatch, [40.0, 5.0], epochs=6, val_every=1, budget=2.0)
    assert code == 0 and status == "finished"
    assert [(r["after_epoch"], r["epochs"]) for r in records if r["event"] == "budget"] == [(1, 2), (2, 6)]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_refit_schedule_gives_the_rates_of_a_run_planned_with_the_new_length(schedule):
    """Two epochs planned for 20, then refitted to 5: the rates of epochs 3..5 are those of a run planned
    for 5 epochs from the start (and a constant or plateau schedule is left alone)."""
    from training.config import build_config
    from training.trainer import make_optimizer, make_scheduler, refit_schedule

    def rates(cfg, refit_after=None, planned=None):
        model = torch.nn.Linear(2, 1)
        optimizer = make_optimizer(cfg, model.parameters())
        scheduler = make_scheduler(cfg, optimizer)
        seen = []
        for epoch in range(int(planned or cfg.epochs)):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            if refit_after is not None and epoch + 1 == refit_after:
                cfg.epochs = planned
                refit_schedule(scheduler, planned)
        return seen

    make = lambda epochs: build_config(None, network="unet", data="phantom", epochs=epochs, schedule=schedule, lr=1e-2)
    assert rates(make(20), refit_after=2, planned=5)[2:] == pytest.approx(rates(make(5))[2:])


def test_a_fine_tuned_run_records_the_weights_it_started_from_also_after_a_resume(trained_run, tmp_path):
    source = torch.load(trained_run / "best.pt", weights_only=True)
    out = tmp_path / "ft"
    common = [*TINY, "--out", str(out), "--epochs", "2", "--input-size", "96", "96", "--batch-size", "8",
              "--slices-per-epoch", "16"]
    start = [*common, "--init-from", str(trained_run / "best.pt"), "--resume", "auto"]
    assert main(["train", *start, "--stop-after-epochs", "1"]) == 0
    assert main(["train", *start]) == 0  # the same command resumes (the weights are not loaded again)
    assert [r.get("resumed_from_epoch") for r in _records(out) if r["event"] == "start"] == [0, 1]
    for name in ("last.pt", "best.pt"):
        origin = load_checkpoint(out / name).raw["training"]["initialised_from"]
        assert origin["file"] == "best.pt" and origin["digest"] == source["digest"]
        assert origin["training"]["epochs_done"] == source["training"]["epochs_done"]
        assert origin["training"]["wall_minutes"] == source["training"]["wall_minutes"]
        assert origin["val_metrics"]["val_dice_mean"] == pytest.approx(source["metrics"]["val_dice_mean"])
        assert "test" not in origin["val_metrics"]
    assert "initialised_from" not in source["training"]  # a run from scratch records none
