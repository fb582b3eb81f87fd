"""Training dock widget driven through its buttons: real ``python -m training`` child processes
on a tiny phantom (CPU), stop/resume, the result used by the Segment widget, and failures."""

import json
import os
import re

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_covidseg.io.geometry import GEOMETRY_KEY
from napari_covidseg.phantom import make_phantom
from napari_covidseg.widgets import common, segment_widget, training_widget
from napari_covidseg.widgets.segment_widget import SegmentWidget
from napari_covidseg.widgets.training_widget import TrainingWidget, parse_extra_args, summarise_data_report

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")
# a network and data small enough that one epoch takes ~1 s on one busy CPU core
TINY_ARGS = ("--network-kwargs '{\"base\": 4}' --phantom-cases 4 --phantom-shape 8 64 64 "
             "--max-steps-per-epoch 12 --threads 1 --augmentation")  # bare: no augmentation
PROCESS_TIMEOUT_MS = 120_000
EPOCHS = 8  # ~0.3-1.5 s each


@pytest.fixture
def make_training_widget():
    """Training widgets whose trainer processes are always ended (even when a test fails)."""
    made = []

    def make(viewer):
        made.append(TrainingWidget(viewer))
        return made[-1]

    yield make
    for widget in made:
        widget.shutdown(timeout_ms=20_000)


@pytest.fixture
def messages(monkeypatch):
    shown = []
    for module in (training_widget, segment_widget, common):
        monkeypatch.setattr(module, "notify_error", lambda e, shown=shown: shown.append(common.error_text(e)))
    return shown


def _tiny_form(widget, out_dir, epochs=6):
    widget.set_network("unet")
    widget.phantom_check.setChecked(True)
    widget.epochs_spin.setValue(epochs)
    widget.batch_spin.setValue(2)
    widget.size_edit.setText("64 64")
    widget.val_spin.setValue(0.25)
    widget.set_device("cpu")
    widget.out_edit.setText(str(out_dir))
    widget.extra_edit.setText(TINY_ARGS)


def _click_and_wait_until_done(qtbot, widget, button):
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=PROCESS_TIMEOUT_MS)


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_form_prefills_the_paper_recipe_and_builds_the_command(make_napari_viewer, tmp_path, messages):
    from napari_covidseg.models import get_network, network_names

    widget = TrainingWidget(make_napari_viewer())
    for name in network_names():
        widget.set_network(name)
        recipe = get_network(name).recipe
        assert widget.epochs_spin.value() == recipe.epochs
        assert widget.batch_spin.value() == recipe.batch_size
        assert widget.lr_spin.value() == pytest.approx(recipe.lr)
        assert widget.size_edit.text().split() == [str(s) for s in recipe.input_size]
        assert name in widget.out_edit.text()  # a fresh output folder per network and run
    _tiny_form(widget, tmp_path / "run")
    widget.target_combo.setCurrentText("lung")
    widget.split_combo.setCurrentIndex(1)
    widget.folds_spin.setValue(4)
    widget.fold_spin.setValue(3)
    cmd = widget.request().command()
    joined = " ".join(cmd)
    for part in ("-m training train", "--network unet", "--data phantom", "--target lung", "--epochs 6",
                 "--batch-size 2", "--input-size 64 64", "--folds 4 --fold 3", "--device cpu", "--threads 1"):
        assert part in joined
    assert "--val-fraction" not in joined
    assert cmd[cmd.index("--network-kwargs") + 1] == '{"base": 4}'  # quotes keep the JSON in one argument
    assert widget.fold_spin.maximum() == 3

    widget.size_edit.setText("64")
    widget.start()
    assert "2D network" in widget.status_label.text() and not widget.is_running()
    widget.size_edit.setText("64 64")
    widget.extra_edit.setText("--network-kwargs '{\"base\": 4}")
    widget.start()
    assert "quotes" in widget.status_label.text() and not widget.is_running()
    # an output folder that holds a run is never overwritten by a new one
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "last.pt").write_bytes(b"x")
    widget.extra_edit.setText("")
    widget.out_edit.setText(str(tmp_path / "used"))
    assert widget.resume_button.isEnabled()
    widget.start()
    assert "already holds a training run" in widget.status_label.text() and not widget.is_running()
    assert (tmp_path / "used" / "last.pt").read_bytes() == b"x"
    widget.new_out_dir()
    assert widget.out_edit.text() != str(tmp_path / "used") and not widget.resume_button.isEnabled()
    assert len(messages) == 3
    with pytest.raises(Exception, match="quotes"):
        parse_extra_args("'")


def test_summary_of_the_check_data_report():
    report = {"data": "/d", "layout": "pairs", "n_cases": 3, "n_groups": 3, "problems": ["case c: the lung mask is empty"],
              "cases": [{"id": "a", "shape": [10, 8, 8], "labels": ["lung", "infection"], "infection_voxels": 5},
                        {"id": "b", "shape": [12, 8, 8], "labels": ["lung", "infection"], "infection_voxels": 0},
                        {"id": "c", "shape": [4, 8, 8], "labels": ["lung"]}],
              "domains": {"display8": {"cases": 2, "slices": 22, "spacing_known": 0},
                          "hu": {"cases": 1, "slices": 4, "spacing_known": 1}}}
    text = summarise_data_report(report)
    assert text.startswith("3 cases found (pairs layout)")
    assert ("8-bit display images: 2 cases, 22 slices, voxel size a placeholder; "
            "CT in HU: 1 case, 4 slices, real voxel size.") in text
    assert "lung masks 3/3, infection masks 2/3 (1 with no infection); 26 slices" in text
    assert "1 problem(s): case c: the lung mask is empty" in text


def test_check_button_counts_cases_and_labels(make_napari_viewer, qtbot, tmp_path):
    import nibabel as nib

    folder = tmp_path / "pairs"
    for sub in ("images", "lung", "infection"):
        (folder / sub).mkdir(parents=True)
    for i, case in enumerate(("case_a", "case_b")):
        phantom = make_phantom(shape=(6, 32, 32), seed=i)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(phantom.ct.astype(np.int16).T, affine), folder / "images" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(phantom.lung.astype(np.uint8).T, affine), folder / "lung" / f"{case}.nii.gz")
        if i == 0:
            nib.save(nib.Nifti1Image(phantom.infection.astype(np.uint8).T, affine), folder / "infection" / f"{case}.nii.gz")

    widget = TrainingWidget(make_napari_viewer())
    assert not widget.check_button.isEnabled()  # the phantom needs no check
    widget.phantom_check.setChecked(False)
    widget.data_edit.setText(str(folder))
    qtbot.mouseClick(widget.check_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.check_label.text() not in ("", "Checking..."), timeout=60_000)
    assert widget.check_label.text().startswith("2 cases found (pairs layout): lung masks 2/2, infection masks 1/2")

    widget.data_edit.setText(str(tmp_path))  # holds a folder but no NIfTI layout
    qtbot.mouseClick(widget.check_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.check_label.text() not in ("", "Checking..."), timeout=60_000)
    assert widget.check_label.text().startswith("Problem: cannot tell the layout")


def test_train_stop_resume_then_segment_with_the_result(make_napari_viewer, make_training_widget, qtbot, tmp_path,
                                                        isolated_catalog, messages):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    phantom = make_phantom(shape=(8, 64, 64), seed=11)
    ct = viewer.add_image(phantom.ct, name="phantom CT", scale=phantom.spacing, contrast_limits=(-1350, 150),
                          metadata={GEOMETRY_KEY: phantom.geometry})
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    widget = make_training_widget(viewer)
    viewer.window.add_dock_widget(widget, name="Training", tabify=True)  # shown in front, full dock height
    out = tmp_path / "run"
    _tiny_form(widget, out, epochs=EPOCHS)
    widget.poll_timer.setInterval(100)  # see the first epoch early, so Stop lands well before the last one
    assert not widget.resume_button.isEnabled() and not widget.stop_button.isEnabled()

    # start, watch the first points arrive, stop
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert widget.is_running() and widget.stop_button.isEnabled() and not widget.start_button.isEnabled()
    assert widget.tabs.currentIndex() == 1  # the progress tab is shown while training
    qtbot.waitUntil(lambda: widget.plot.n_points >= 1 or not widget.is_running(), timeout=PROCESS_TIMEOUT_MS)
    assert widget.is_running(), widget.status_label.text()
    assert re.search(rf"Epoch \d/{EPOCHS} done: val Dice lung \d\.\d{{3}}, infection \d\.\d{{3}}",
                     widget.status_label.text()) and "ETA" in widget.status_label.text()
    assert widget.progress.maximum() == EPOCHS and widget.progress.value() >= 1 and "ETA" in widget.progress.format()
    assert not widget.setup_page.isEnabled()  # the form is locked while the run uses it
    _click_and_wait_until_done(qtbot, widget, widget.stop_button)
    assert widget.last_status == "stopped", widget.status_label.text()
    assert "stopped" in widget.status_label.text() and "Resume" in widget.status_label.text()
    assert (out / "last.pt").is_file()
    stopped_at = widget.plot.n_points
    assert 1 <= stopped_at < EPOCHS
    assert widget.resume_button.isEnabled() and widget.setup_page.isEnabled()

    # resume: epochs go on from the checkpoint, the plot keeps the earlier points and gets more
    _click_and_wait_until_done(qtbot, widget, widget.resume_button)
    assert widget.last_status == "finished", widget.status_label.text()
    records = _metrics(out)
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from_epoch"] == stopped_at
    resumed_epochs = [r["epoch"] for r in records[records.index(starts[1]):] if r["event"] == "epoch"]
    assert resumed_epochs == list(range(stopped_at + 1, EPOCHS + 1))
    assert widget.plot.n_points == EPOCHS and widget.progress.value() == EPOCHS
    assert f"finished after epoch {EPOCHS}/{EPOCHS}" in widget.status_label.text()
    assert "Segment widget" in widget.status_label.text()
    assert re.search(r"best\.pt \(val Dice lung \d\.\d{3}, infection \d\.\d{3}\)", widget.status_label.text())

    os.makedirs(SCREENSHOTS, exist_ok=True)
    qtbot.wait(300)
    viewer.window._qt_window.grab().save(os.path.join(SCREENSHOTS, "training_widget.png"))

    # the best checkpoint is in the Segment widget's weights list and runs on the open CT
    best = os.path.abspath(out / "best.pt")
    assert widget.finished_checkpoint == str(out / "best.pt")
    segment.set_network("unet")
    assert best in [segment.weights.combo.itemData(i) for i in range(segment.weights.combo.count())]
    assert segment.weights.select_path(best)
    segment.set_device("cpu")
    assert segment.ct_combo.current_layer() is ct
    qtbot.mouseClick(segment.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not segment.runner.is_running(), timeout=60_000)
    for name in ("unet lung", "unet infection"):
        assert viewer.layers[name].data.shape == ct.data.shape
    assert messages == []


def test_failures_are_reported_in_plain_words(make_napari_viewer, make_training_widget, qtbot, tmp_path, messages):
    viewer = make_napari_viewer()
    widget = make_training_widget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")

    # a data folder the trainer cannot read: the check before launch refuses it, no trainer starts
    bad = tmp_path / "not_ct"
    bad.mkdir()
    (bad / "notes.txt").write_text("no CT here")
    _tiny_form(widget, tmp_path / "bad_data_run")
    widget.phantom_check.setChecked(False)
    widget.data_edit.setText(str(bad))
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert widget.is_running() and not widget.start_button.isEnabled()  # checking the folder
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=PROCESS_TIMEOUT_MS)
    status = widget.status_label.text()
    assert widget.process is None and widget.last_status is None
    assert "cannot be trained on" in status and "cannot tell the layout of" in status
    assert "Traceback" not in status
    assert messages and "cannot be trained on" in messages[-1]
    # an empty folder field never starts anything
    widget.data_edit.setText("")
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert not widget.is_running() and "Choose a data folder" in widget.status_label.text()

    # a folder that does not exist is refused before anything starts
    widget.data_edit.setText(str(tmp_path / "missing"))
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert not widget.is_running() and "does not exist" in widget.status_label.text()

    # CUDA asked for: without a GPU the run fails and says so, with one it trains on the GPU; never a
    # silent fall-back to the CPU (this check used to skip itself whenever the run did not fail)
    import torch

    widget.phantom_check.setChecked(True)
    widget.out_edit.setText(str(tmp_path / "cuda_run"))
    widget.set_device("cuda")
    _click_and_wait_until_done(qtbot, widget, widget.start_button)
    status = widget.status_label.text()
    log = tmp_path / "cuda_run" / "metrics.jsonl"
    records = _metrics(tmp_path / "cuda_run") if log.exists() else []
    if torch.cuda.is_available():
        assert widget.last_status == "finished", status
        assert [r["device"] for r in records if r["event"] in ("start", "epoch")] == ["cuda"] * (1 + 6)
    else:
        assert widget.last_status == "failed", status
        assert status.startswith("Training failed: CUDA was requested but no usable NVIDIA GPU was found")
        assert "Last log lines:" in status and "cuda" in status.split("Last log lines:")[1].lower()
        assert not [r for r in records if r["event"] in ("start", "epoch")]  # nothing was trained on the CPU instead
        assert not (tmp_path / "cuda_run" / "last.pt").exists()

    # napari is still alive and usable
    layer = viewer.add_image(np.zeros((4, 4)), name="still here")
    assert viewer.layers["still here"] is layer
    assert widget.start_button.isEnabled()


# --- the Qt-free half (napari_covidseg.training_run) -------------------------------------------
def test_request_validation_and_kfold_command(tmp_path):
    from napari_covidseg.errors import InputError
    from napari_covidseg.training_run import TrainingRequest

    req = TrainingRequest(network="unet", data="phantom", out_dir=str(tmp_path), folds=5, fold=2, init_from="shipped",
                          small_network=True, extra_args=["--threads", "1"])
    cmd = " ".join(req.command(python="py"))
    assert cmd.startswith("py -u -m training train --network unet --data phantom")
    assert "--folds 5 --fold 2" in cmd and "--val-fraction" not in cmd
    assert "--init-from shipped" in cmd and "--net-kwargs-shipped" in cmd and cmd.endswith("--threads 1")
    for kwargs, words in (({"data": str(tmp_path / "nope")}, "does not exist"), ({"out_dir": ""}, "output folder"),
                          ({"folds": 5, "fold": 5}, "between 0 and 4"), ({"resume": str(tmp_path / "x.pt")}, "resume"),
                          ({"target": "heart"}, "Unknown target")):
        with pytest.raises(InputError, match=words):
            TrainingRequest(**{"network": "unet", "data": "phantom", "out_dir": str(tmp_path), **kwargs}).validate()


def test_metrics_tail_reads_only_complete_new_lines(tmp_path):
    from napari_covidseg.training_run import MetricsTail, eta_seconds, format_duration

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == []  # not there yet
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "epochs": 4}) + "\n" + json.dumps({"event": "epoch", "epoch": 1, "seconds": 10.0})
                + '\n{"event": "epoch", "epo')  # the last record is still being written
    assert [r["event"] for r in tail.poll()] == ["start", "epoch"]
    with open(path, "a") as f:
        f.write('ch": 2, "seconds": 20.0}\nnot json\n' + json.dumps({"event": "end", "status": "stopped"}) + "\n")
    assert tail.poll()[0] == {"event": "epoch", "epoch": 2, "seconds": 20.0}
    assert [r["epoch"] for r in tail.epochs] == [1, 2] and tail.end["status"] == "stopped"
    assert eta_seconds(tail.epochs, 4) == pytest.approx(30.0) and eta_seconds([], 4) is None
    assert format_duration(70) == "1:10" and format_duration(3725) == "1:02:05" and format_duration(None) == "--"


def test_failure_messages_are_plain_words():
    from napari_covidseg.training_run import plain_failure_message

    oom = plain_failure_message({"error": "CUDA out of memory. Tried to allocate 2 GiB"}, 1, [])
    assert "ran out of memory" in oom and "batch size" in oom
    cuda = plain_failure_message({"error": "device 'cuda' was asked for but CUDA is not available here"}, 1, [])
    assert cuda.startswith("CUDA was requested but no usable NVIDIA GPU was found")
    # no end record (bad arguments): the CLI's "error:" line is the reason
    assert plain_failure_message(None, 2, ["usage: ...", "error: unknown augmentation(s) foo"]) == "unknown augmentation(s) foo"
    assert "killed" in plain_failure_message(None, -9, [])
    assert "exit code 3" in plain_failure_message(None, 3, ["something"])


def test_epoch_bar_follows_the_form_quick_preset_and_progress_within_an_epoch(make_napari_viewer, qtbot):
    from napari_covidseg.widgets.training_form import QUICK_EPOCHS, QUICK_STEPS_PER_EPOCH
    from napari_covidseg.widgets.training_progress import TrainingProgress

    widget = TrainingWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.epochs_spin.setValue(12)
    assert widget.progress.maximum() == 12 and widget.progress.value() == 0  # never a stale count
    qtbot.mouseClick(widget.quick_button, Qt.LeftButton)
    assert widget.epochs_spin.value() == QUICK_EPOCHS and widget.small_check.isChecked()
    assert widget.device_combo.currentData() == "cpu" and widget.progress.maximum() == QUICK_EPOCHS
    assert f"--max-steps-per-epoch {QUICK_STEPS_PER_EPOCH}" in widget.extra_edit.text()
    assert widget.finetune_check.isChecked() == widget.finetune_check.isEnabled()

    view = TrainingProgress()
    view.begin(4, [])
    view.step_bar.show()
    view.take([{"event": "start", "epochs": 4}], [], [], now=100.0)
    view.tick(now=130.0)
    assert view.step_bar.maximum() == 0  # before the first epoch: busy, no made-up number
    epoch1 = {"event": "epoch", "epoch": 1, "epochs": 4, "seconds": 60.0, "device": "cpu",
              "val": {"lung": {"dice": 0.9}, "infection": {"dice": 0.02}}, "val_dice_mean": 0.46}
    text = view.take([epoch1], [epoch1], [epoch1], now=160.0)
    assert text.startswith("Epoch 1/4 done: val Dice lung 0.900, infection 0.020")  # not the 0.46 mean
    view.tick(now=190.0)  # 30 s into epoch 2, epochs take 60 s
    assert view.step_bar.value() == 50 and view.step_bar.format() == "epoch 2: 50% (estimated)"
    view.take([{"event": "step", "epoch": 2, "step": 3, "steps": 4}], [epoch1], [epoch1], now=195.0)
    view.tick(now=195.0)
    assert view.step_bar.value() == 75 and view.step_bar.format() == "epoch 2: 75%"  # the trainer's own count
