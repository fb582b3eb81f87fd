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
