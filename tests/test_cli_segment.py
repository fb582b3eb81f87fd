"""``covidseg segment``: masks written with the CT's geometry, never overwriting, clear errors."""

import argparse

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_covidseg import checkpoint as ckpt
from napari_covidseg import cli_segment
from napari_covidseg.checkpoint import save_checkpoint
from napari_covidseg.models import get_network
from napari_covidseg.phantom import make_phantom

SMALL_UNET = {"base": 4, "depth": 2}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="covidseg")
    sub = parser.add_subparsers(dest="command")
    cli_segment.add_parser(sub)
    return parser.parse_args(argv)


@pytest.fixture
def ct_file(tmp_path):
    ph = make_phantom(shape=(6, 40, 48), spacing=(5.0, 8.0, 7.0), seed=0)
    # store in an oblique-free but non-display orientation (RAS, shifted origin) to check the affine is kept
    affine = np.array([[7.0, 0, 0, -160.0], [0, 8.0, 0, -150.0], [0, 0, 5.0, 30.0], [0, 0, 0, 1]])
    file_array = np.transpose(ph.ct, (2, 1, 0))[::-1, ::-1, :].astype(np.int16)  # (z,y,x) LPS -> (x,y,z) RAS
    path = tmp_path / "case01.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(file_array), affine), str(path))
    return path, affine, file_array.shape


@pytest.fixture
def unet_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = get_network("unet").create(**SMALL_UNET)
    return save_checkpoint(tmp_path / "ckpt" / "unet.pt", model, "unet", SMALL_UNET)


def test_writes_two_masks_with_the_ct_affine(ct_file, unet_checkpoint, tmp_path, capsys):
    ct_path, affine, file_shape = ct_file
    out = tmp_path / "out"
    args = _parse(["segment", str(ct_path), "--network", "unet", "--checkpoint", str(unet_checkpoint),
                   "--device", "cpu", "--out-dir", str(out), "--probabilities"])
    assert args.func is cli_segment.run
    assert cli_segment.run(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case01_unet_infection.nii.gz", "case01_unet_infection_prob.nii.gz",
                     "case01_unet_lung.nii.gz", "case01_unet_lung_prob.nii.gz"]
    for name in names:
        img = nib.load(str(out / name))
        np.testing.assert_allclose(img.affine, affine)
        assert img.shape == file_shape
    lung = np.asarray(nib.load(str(out / "case01_unet_lung.nii.gz")).dataobj)
    prob = np.asarray(nib.load(str(out / "case01_unet_lung_prob.nii.gz")).dataobj)
    assert set(np.unique(lung)) <= {0, 1}
    np.testing.assert_array_equal(lung, (prob > 0.5).astype(lung.dtype))
    assert "wrote" in capsys.readouterr().err


def test_refuses_to_overwrite_before_running(ct_file, unet_checkpoint, tmp_path, capsys):
    ct_path, _, _ = ct_file
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "case01_unet_lung.nii.gz"
    existing.write_bytes(b"keep me")
    argv = ["segment", str(ct_path), "-n", "unet", "-c", str(unet_checkpoint), "--device", "cpu", "-o", str(out)]
    assert cli_segment.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and "Traceback" not in err
    assert existing.read_bytes() == b"keep me"
    assert not (out / "case01_unet_infection.nii.gz").exists()
    assert cli_segment.run(_parse(argv + ["--overwrite", "-q"])) == 0
    assert nib.load(str(existing)).shape == ct_file[2]


def test_errors_are_messages_and_nonzero(ct_file, unet_checkpoint, tmp_path, capsys, monkeypatch):
    ct_path, _, _ = ct_file
    out = str(tmp_path / "out")

    def fails(argv, *fragments):
        assert cli_segment.run(_parse(["segment"] + argv + ["-o", out])) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in err, err

    fails([str(tmp_path / "missing.nii.gz"), "-n", "unet", "-c", str(unet_checkpoint)], "does not exist")
    fails([str(ct_path), "-n", "ms_unet_that_is_not", "-c", str(unet_checkpoint)], "holds an `unet`")
    fails([str(ct_path), "-n", "nope"], "unknown network 'nope'")
    fails([str(ct_path)], "give --network")
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", tmp_path / "no_weights")
    fails([str(ct_path), "-n", "unet"], "no shipped weights for `unet`")
    fails([str(ct_path), "-n", "unet", "-c", str(unet_checkpoint), "--threshold", "2"], "--threshold")
    if not torch.cuda.is_available():
        fails([str(ct_path), "-n", "unet", "-c", str(unet_checkpoint), "--device", "cuda"], "CUDA is not available")
    # a mask given in place of the CT
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8) + np.eye(8, dtype=np.uint8)[..., None], np.eye(4)), str(mask_path))
    fails([str(mask_path), "-n", "unet", "-c", str(unet_checkpoint)], "looks like a mask")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_case_name():
    from pathlib import Path

    assert cli_segment.case_name(Path("/a/coronacases_001.nii.gz")) == "coronacases_001"
    assert cli_segment.case_name(Path("x.nii")) == "x"


def _second_ct(ct_file, folder_name="other", name="case02.nii.gz"):
    """A copy of the fixture's CT (same geometry) under another name or folder."""
    ct_path = ct_file[0]
    folder = ct_path.parent / folder_name
    folder.mkdir(exist_ok=True)
    copy = folder / name
    copy.write_bytes(ct_path.read_bytes())
    return copy


def _summary(path):
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_cohort_is_segmented_with_the_network_loaded_once_and_summarised(ct_file, unet_checkpoint, tmp_path,
                                                                           monkeypatch):
    ct_path, affine, file_shape = ct_file
    second = _second_ct(ct_file)
    loads = []
    load_model = cli_segment._load_model
    monkeypatch.setattr(cli_segment, "_load_model", lambda args: loads.append(1) or load_model(args))
    out, summary = tmp_path / "out", tmp_path / "tables" / "volumes.csv"
    argv = ["segment", str(ct_path), str(second), "-n", "unet", "-c", str(unet_checkpoint), "--device", "cpu",
            "-o", str(out), "--summary", str(summary), "-q"]
    assert cli_segment.run(_parse(argv)) == 0
    assert len(loads) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{case}_unet_{cls}.nii.gz" for case in ("case01", "case02") for cls in ("lung", "infection"))
    rows = _summary(summary)
    assert [(r["case"], r["status"], r["volume_unit"]) for r in rows] == [("case01", "ok", "mL"), ("case02", "ok", "mL")]
    voxel_ml = 5.0 * 8.0 * 7.0 / 1000.0
    for row in rows:
        lung = np.asarray(nib.load(row["lung_file"]).dataobj)
        infection = np.asarray(nib.load(row["infection_file"]).dataobj)
        assert float(row["lung"]) == pytest.approx(lung.sum() * voxel_ml, rel=1e-5)
        assert float(row["infection"]) == pytest.approx(infection.sum() * voxel_ml, rel=1e-5, abs=1e-9)
        assert row["severity_grade"].startswith("CT-")
    assert rows[0]["lung"] == rows[1]["lung"]  # the same CT twice over: the same figures
    # the summary is never replaced without --overwrite, and that is checked before any inference
    assert cli_segment.run(_parse(argv[:-1] + ["-o", str(tmp_path / "out2"), "-q"])) == 2
    assert not (tmp_path / "out2").exists()


def test_a_ct_that_fails_is_reported_and_the_others_are_segmented(ct_file, unet_checkpoint, tmp_path, capsys):
    ct_path, _, _ = ct_file
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8) + np.eye(8, dtype=np.uint8)[..., None], np.eye(4)),
             str(mask_path))
    out, summary = tmp_path / "out", tmp_path / "volumes.csv"
    argv = ["segment", str(mask_path), str(ct_path), "-n", "unet", "-c", str(unet_checkpoint), "--device", "cpu",
            "-o", str(out), "--summary", str(summary)]
    assert cli_segment.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert "looks like a mask" in err and "1 of 2 CTs segmented" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["case01_unet_infection.nii.gz", "case01_unet_lung.nii.gz"]
    rows = _summary(summary)
    assert [r["case"] for r in rows] == ["mask", "case01"]
    assert "looks like a mask" in rows[0]["status"] and rows[0]["lung"] == ""
    assert rows[1]["status"] == "ok" and float(rows[1]["lung"]) >= 0


def test_a_cohort_is_checked_whole_before_any_inference(ct_file, unet_checkpoint, tmp_path, capsys):
    ct_path, _, _ = ct_file
    out = tmp_path / "out"
    common = ["-n", "unet", "-c", str(unet_checkpoint), "--device", "cpu", "-o", str(out)]

    def refused(cts, extra, fragment):
        assert cli_segment.run(_parse(["segment"] + [str(c) for c in cts] + common + extra)) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
        assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["case02_unet_lung.nii.gz"]

    same_name = _second_ct(ct_file, "elsewhere", ct_path.name)
    refused([ct_path, same_name], [], "would both write case01_unet_lung.nii.gz")
    refused([ct_path, ct_path], [], "is given twice")
    refused([ct_path, tmp_path / "missing.nii.gz"], [], "does not exist")
    refused([ct_path, same_name], ["--series", "1"], "give one CT with it")
    second = _second_ct(ct_file)
    out.mkdir()
    (out / "case02_unet_lung.nii.gz").write_bytes(b"keep me")  # the second CT's output: the first is not run either
    refused([ct_path, second], [], "already exist")
    assert (out / "case02_unet_lung.nii.gz").read_bytes() == b"keep me"


def test_an_interrupted_cohort_keeps_what_it_finished(ct_file, unet_checkpoint, tmp_path, capsys, monkeypatch):
    ct_path, _, _ = ct_file
    second = _second_ct(ct_file)
    segment_case = cli_segment._segment_case
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment_case(*args, **kwargs)

    monkeypatch.setattr(cli_segment, "_segment_case", interrupted_on_the_second)
    out, summary = tmp_path / "out", tmp_path / "volumes.csv"
    argv = ["segment", str(ct_path), str(second), "-n", "unet", "-c", str(unet_checkpoint), "--device", "cpu",
            "-o", str(out), "--summary", str(summary), "-q"]
    assert cli_segment.run(_parse(argv)) == 130
    assert "interrupted at" in capsys.readouterr().err
    assert [r["case"] for r in _summary(summary)] == ["case01"]
    assert sorted(p.name for p in out.iterdir()) == ["case01_unet_infection.nii.gz", "case01_unet_lung.nii.gz"]
