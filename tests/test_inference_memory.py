"""Bounded memory: ``covidseg segment`` on a large int16 CT needs little more than the CT and its
masks (issue 13: under 1.5x the CT's float32 size), measured as the peak resident memory of a
process of its own (``tests/memory_probe.py``), which the machine's load does not change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_covidseg.checkpoint import save_checkpoint
from napari_covidseg.models import get_network
from napari_covidseg.preprocessing import Preprocessing

PROBE = Path(__file__).with_name("memory_probe.py")
#: two CTs that differ only in their number of slices: what the run adds per CT voxel is the
#: difference of their peaks over the difference of their sizes (constants such as the network's
#: own working memory for one batch or patch cancel out)
SMALL, LARGE = (100, 256, 256), (300, 256, 256)
#: small networks: the test measures the pipeline's arrays, not a network's activations
NETWORKS = {
    "unet": ({"base": 4, "depth": 2}, Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax")),
    "qchc_unet3d": ({"base": 2}, Preprocessing(hu_min=-1250, hu_max=250, normalisation="zscore",
                                               target_spacing=(1.0, 1.0, 1.0))),
}


def write_ct(path: Path, shape) -> Path:
    rng = np.random.default_rng(0)
    file_array = rng.integers(-1024, 400, size=shape[::-1], dtype=np.int16)  # (x, y, z) on disk
    nib.save(nib.Nifti1Image(file_array, np.diag([0.8, 0.8, 1.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def cts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    return write_ct(folder / "small.nii", SMALL), write_ct(folder / "large.nii", LARGE)


def probe(ct, checkpoint, out_dir, extra=()):
    """The memory probe's JSON for ``covidseg segment`` of ``ct`` in a new process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(PROBE), str(ct), str(checkpoint), str(out_dir), "--", *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_segment_memory_per_ct_voxel_is_bounded(cts, network, tmp_path):
    kwargs, prep = NETWORKS[network]
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / f"{network}.pt", get_network(network).create(**kwargs), network, kwargs, prep)
    extra = ["--batch-size", "4", "--patch-size", "16", "32", "32"]  # a small network's working memory: noise
    small, large = (probe(ct, checkpoint, tmp_path / ct.stem, extra) for ct in cts)
    per_voxel = (large["added_mb"] - small["added_mb"]) * 2**20 / (np.prod(LARGE) - np.prod(SMALL))
    # issue 13: under 1.5x the CT's float32 size (6 bytes per voxel); the CT itself (int16) and
    # its two uint8 masks are 4 of them, the pipeline adds the rest
    print(f"{network}: {per_voxel:.2f} bytes per CT voxel", small, large)
    assert per_voxel < 6.0, (small, large, per_voxel)
    masks = sorted(p.name for p in (tmp_path / "large").iterdir())
    assert masks == [f"large_{network}_infection.nii", f"large_{network}_lung.nii"]
    assert nib.load(str(tmp_path / "large" / masks[1])).shape == LARGE[::-1]


def test_packed_masks_are_the_masks():
    """``covidseg segment`` holds its masks bit-packed (an eighth of the memory): unpacked they are
    exactly the uint8 masks, also where x is not a multiple of 8."""
    from napari_covidseg.inference import _Output

    prob = torch.rand((7, 2, 5, 13), generator=torch.Generator().manual_seed(0))
    plain, packed = _Output((9, 5, 13), 0.5, None), _Output((9, 5, 13), 0.5, None, packed=True)
    for output in (plain, packed):
        output.put(2, prob)
    assert packed.masks.nbytes * 6 < plain.masks.nbytes
    for channel in (0, 1):
        assert packed.mask(channel).dtype == np.uint8
        np.testing.assert_array_equal(packed.mask(channel), plain.mask(channel))


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_a_handed_over_ct_is_let_go_before_a_3d_network_runs(network, monkeypatch):
    """``covidseg segment`` hands its CT over: a 3D network lets it go once its own volume is built,
    so no patch runs while the CT is held; a 2D network reads it to the end.  Same masks as a CT
    passed as an array."""
    import weakref

    from napari_covidseg import inference
    from napari_covidseg.inference import HandedOverCT, run_prediction

    kwargs, prep = NETWORKS[network]
    spec = get_network(network)
    torch.manual_seed(0)
    model = spec.create(**kwargs).eval()
    ct = np.random.default_rng(1).integers(-1024, 400, size=(24, 40, 40)).astype(np.int16)
    expected = run_prediction(model, spec, ct, (1.0, 1.0, 1.0), prep, threshold=0.5, device="cpu",
                              patch_size=(16, 32, 32)).masks
    handed = ct.copy()
    alive = weakref.ref(handed)
    handover = HandedOverCT(handed)
    del handed  # as the CLI does: the hand-over holds the only reference
    seen = []
    forward = inference._forward_logits

    def watched(*args):  # whatever runs the network (PyTorch, ONNX Runtime)
        seen.append(alive() is not None)
        return forward(*args)

    monkeypatch.setattr(inference, "_forward_logits", watched)
    got = run_prediction(model, spec, handover, (1.0, 1.0, 1.0), prep, threshold=0.5, device="cpu",
                         patch_size=(16, 32, 32))
    np.testing.assert_array_equal(got.masks, expected)
    assert seen and all(held == (spec.dims == 2) for held in seen), seen
    assert alive() is None
