"""benchmarks.training_runs: the table of every training run and the validation rule for what ships."""

from benchmarks import training_runs
from training.metrics_log import MetricsLog


def _run(folder, scores, seconds=60.0):
    """A run folder whose validated epochs (every 2nd) have the mean Dice ``scores``."""
    folder.mkdir(parents=True)
    log = MetricsLog(folder)
    for i, score in enumerate(scores, start=1):
        validated = {"val_dice_mean": score, "val": {"lung": {"dice": 0.9}, "infection": {"dice": score - 0.1}}}
        log.record("epoch", epoch=2 * i - 1, seconds=seconds)
        log.record("epoch", epoch=2 * i, seconds=seconds, device="cuda", **validated)
    return folder


def test_summary_takes_the_best_validated_epoch_and_counts_every_epoch(tmp_path):
    summary = training_runs.summarize(_run(tmp_path / "run", [0.5, 0.8, 0.7]))
    assert summary["epochs"] == 6 and summary["minutes"] == 6.0
    assert summary["best_epoch"] == 4 and summary["val_dice_mean"] == 0.8
    assert summary["val_infection"] == 0.8 - 0.1 and summary["val_lung"] == 0.9
    assert training_runs.summarize(tmp_path / "missing") is None


def test_the_run_with_the_best_validation_ships_and_is_marked(tmp_path, monkeypatch):
    for name, scores in (("real", [0.6, 0.7]), ("real_gpu", [0.75]), ("real_gpu_run1", [0.72])):
        _run(tmp_path / name / "unet", scores)
    table = training_runs.collect(tmp_path)
    assert set(table["unet"]) == {"real", "real_gpu", "real_gpu_run1"} and table["chs_net"] == {}
    assert training_runs.chosen(table["unet"]) == "real_gpu" and training_runs.chosen({}) is None
    lines = training_runs.report(table)
    assert any(line.startswith("| `unet` | **real_gpu** |") and "**0.750**" in line for line in lines)
    assert sum("**" in line for line in lines if line.startswith("| `unet`")) == 1
