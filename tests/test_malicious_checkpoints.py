"""Malicious checkpoints at every entry point that loads one: the Python API (load_checkpoint,
read_checkpoint_info, load_shipped), the GUI's weights list (Browse...) and the Segment and
Side-by-side workers, ``covidseg segment --checkpoint``, ``python -m training evaluate --checkpoint``,
``train --init-from`` and ``train --resume``.  Every payload is refused with a message, and the
marker file its code would create never appears: nothing from the file ran."""

from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import write_malicious
from napari_covidseg import checkpoint as ckpt
from napari_covidseg.errors import CheckpointError

#: payloads by route: a field of a covidseg-looking zip, the weights, a plain pickle, torch's legacy format
CHOSEN = ("os_system_in_training", "builtins_exec_in_training", "open_for_writing_in_training", "in_state_dict",
          "top_level", "legacy_pickle", "legacy_torch_format")
TRAIN = ["--data", "phantom", "--phantom-cases", "3", "--phantom-shape", "8", "32", "32", "--device", "cpu",
         "--threads", "1", "--network", "unet", "--network-kwargs", '{"base": 4, "depth": 2}', "--input-size", "32", "32",
         "--epochs", "1", "--slices-per-epoch", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    files = write_malicious(tmp_path / "evil", marker)
    yield {name: files[name] for name in CHOSEN}, marker
    assert not marker.exists(), "code from a checkpoint ran"


def _ct_file(tmp_path) -> Path:
    import nibabel as nib

    ct = np.random.default_rng(0).integers(-1000, 300, (32, 32, 8)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.diag([-1.0, -1.0, 2.5, 1.0])), str(path))
    return path


def test_python_api(evil, tmp_path, monkeypatch):
    files, marker = evil
    for path in files.values():
        for load in (ckpt.load_checkpoint, ckpt.read_checkpoint_info, ckpt.read_raw):
            with pytest.raises(CheckpointError):
                load(path)
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    for path in files.values():  # a tampered file among the shipped weights
        (tmp_path / "weights" / "unet.pt").write_bytes(Path(path).read_bytes())
        with pytest.raises(CheckpointError):
            ckpt.load_shipped("unet")
    assert not marker.exists()


def test_gui_weights_list_and_workers(evil, isolated_catalog):
    from napari_covidseg.widgets.segment_widget import RunRequest, run_segmentation
    from napari_covidseg.widgets.side_by_side_widget import Job, run_networks

    files, marker = evil
    ct = np.full((4, 32, 32), -800, np.int16)
    for path in files.values():
        with pytest.raises(CheckpointError):
            isolated_catalog.add_checkpoint(path)  # Browse... in the Segment widget
        with pytest.raises(CheckpointError):
            run_segmentation(RunRequest(ct=ct, spacing=(2.5, 1.0, 1.0), network="unet", weights_path=str(path),
                                        device="cpu", threshold=0.5))
        with pytest.raises(CheckpointError):
            run_networks([Job("unet", str(path))], ct, (2.5, 1.0, 1.0), "lung", None, 0.5, "cpu")
    assert isolated_catalog.user_entries() == []
    assert not marker.exists()


def test_covidseg_segment(evil, tmp_path, capsys):
    from napari_covidseg.cli import main

    files, marker = evil
    ct = _ct_file(tmp_path)
    for name, path in files.items():
        code = main(["segment", str(ct), "--checkpoint", str(path), "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("covidseg segment: error: ") and "Traceback" not in err, (name, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not marker.exists()


def test_training_evaluate_init_from_and_resume(evil, tmp_path, capsys):
    from training.cli import main

    files, marker = evil

    def one_error_line(name):
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)

    for name, path in files.items():
        code = main(["evaluate", "--checkpoint", str(path), "--data", "phantom", "--phantom-cases", "2",
                     "--phantom-shape", "8", "32", "32", "--out", str(tmp_path / "eval"), "--device", "cpu"])
        assert code == 2, name
        one_error_line(name)
        assert main(["train", *TRAIN, "--out", str(tmp_path / f"init_{name}"), "--init-from", str(path)]) == 2, name
        one_error_line(name)
        assert not (tmp_path / f"init_{name}" / "last.pt").exists()
        resumed = tmp_path / f"resume_{name}"
        resumed.mkdir()
        (resumed / "last.pt").write_bytes(Path(path).read_bytes())  # a tampered last.pt in a run folder
        assert main(["train", *TRAIN, "--out", str(resumed), "--resume", "auto"]) == 2, name
        one_error_line(name)
    assert not marker.exists()
