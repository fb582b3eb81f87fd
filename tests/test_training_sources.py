"""Training on several real-style folders at once: per-source options, label masking in every
network's loss, single-slice cases of different sizes, 8-bit and HU cases together."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_covidseg.errors import DataFolderError
from napari_covidseg.models import get_network, network_names
from training.datasets import load_sources, phantom_cases
from training.samples import PreparedCase, SampleDataset
from training.sources import as_sources, parse_source, sampling_shares


def _write(path, array, zooms=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])), str(path))


def _slice_folder(root, n=4, seed=0):
    """Inf-Net-like: 8-bit single slices of different sizes, infection masks, rough lung masks."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = 40 + 6 * k, 30 + 4 * k
        img = rng.integers(0, 256, (h, w, 1)).astype(np.uint8)
        lung = np.zeros((h, w, 1), np.uint8)
        lung[5:-5, 5:-5] = 1
        inf = np.zeros((h, w, 1), np.uint8)
        inf[10:15, 10:14] = 1
        _write(root / "images" / f"{k}.nii.gz", img)
        _write(root / "lung" / f"{k}.nii.gz", lung)
        _write(root / "infection" / f"{k}.nii.gz", inf)
    return root


def test_source_options_parse_and_explain_mistakes():
    s = parse_source("/data/infnet,labels=infection,weight=0.25")
    assert s.path == "/data/infnet" and s.labels == ("infection",) and s.weight == 0.25 and s.name == "infnet"
    assert parse_source("phantom,cases=6,healthy=2").healthy == 2
    with pytest.raises(DataFolderError, match="unknown option"):
        parse_source("/data/x,lables=lung")
    with pytest.raises(DataFolderError, match="labels"):
        parse_source("/data/x,labels=tumour")
    with pytest.raises(DataFolderError, match=r"weight must be in \(0, 1\]"):
        parse_source("/data/x,weight=2")
    twins = as_sources(["/a/images", "/b/images"])
    assert twins[0].name != twins[1].name


def test_sampling_shares_fill_the_rest_by_slices():
    sources = as_sources(["/a,weight=0.2", "/b", "/c"])
    assert sampling_shares(sources, [10, 300, 100]) == pytest.approx([0.2, 0.6, 0.2])
    with pytest.raises(DataFolderError, match="add up"):
        sampling_shares(as_sources(["/a,weight=0.7", "/b,weight=0.6"]), [1, 1])


def test_several_folders_combine_with_prefixed_ids_and_trusted_labels(tmp_path):
    a = _slice_folder(tmp_path / "a")
    b = _slice_folder(tmp_path / "b", seed=1)
    sources, layouts, cases = load_sources([str(a), f"{b},labels=infection", "phantom,cases=2,healthy=1"],
                                           phantom_shape=(4, 32, 32))
    assert layouts == ["pairs", "pairs", "phantom"]
    ids = [c.case_id for c in cases]
    assert "a/0" in ids and "b/0" in ids and "phantom/phantom_001_healthy" in ids
    by_id = {c.case_id: c for c in cases}
    assert by_id["a/1"].lung is not None and by_id["b/1"].lung is None  # untrusted lung dropped
    assert by_id["a/2"].domain == "display8" and by_id["phantom/phantom_000"].domain == "hu"
    assert not by_id["phantom/phantom_001_healthy"].infection.any()
    assert len({c.group for c in cases}) == len(cases)


def test_prepared_cases_bring_every_size_onto_the_training_grid(tmp_path):
    from napari_covidseg.intensity import CT_SEG_PNG_RECIPE
    from napari_covidseg.preprocessing import Preprocessing

    _, _, cases = load_sources([f"{_slice_folder(tmp_path / 'a')},labels=infection", "phantom,cases=2"],
                               phantom_shape=(4, 48, 48))
    prep = Preprocessing(domain="display8", hu_to_display8=CT_SEG_PNG_RECIPE.to_dict(), inplane_size=(64, 64))
    prepared = [PreparedCase(c, prep, 2) for c in cases]
    assert {p.image.shape[1:] for p in prepared} == {(64, 64)}
    assert all(p.target.shape == (2,) + p.image.shape for p in prepared)
    assert prepared[0].known.tolist() == [0.0, 1.0] and prepared[-1].known.tolist() == [1.0, 1.0]
    data = SampleDataset(prepared, 2, (64, 64), ["flip", "lowres"], {"lowres": 1.0}, 8, 0, 0.9, crop_size=(32, 32))
    x, y, w = data[0]
    assert x.shape == (1, 32, 32) and y.shape == w.shape == (2, 32, 32)


def test_thin_cases_are_padded_for_3d_and_the_padding_is_masked_out():
    from napari_covidseg.preprocessing import Preprocessing

    case = phantom_cases(2, (4, 32, 32))[0]
    case.ct, case.lung, case.infection = case.ct[:1], case.lung[:1], case.infection[:1]  # a single slice
    prepared = PreparedCase(case, Preprocessing(normalisation="zscore"), 3)
    data = SampleDataset([prepared], 3, (8, 32, 32), [], {}, 2, 0, 1.0)
    x, y, w = data[0]
    assert x.shape == (1, 8, 32, 32) and w.shape == (2, 8, 32, 32)
    assert w[:, :1].min() == 1 and w[:, 1:].max() == 0


@pytest.mark.parametrize("network", network_names())
def test_every_loss_ignores_masked_channels_and_voxels(network):
    """No gradient reaches a channel or voxel whose label is unknown (weight 0)."""
    spec = get_network(network)
    torch.manual_seed(0)
    shape = (2, 1, 8, 32, 32) if spec.dims == 3 else (2, 1, 32, 32)
    model = spec.create(base=4)
    outputs = model(torch.randn(shape))
    for v in outputs.values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            t.retain_grad()
    target = (torch.rand((2, 2) + shape[2:]) > 0.5).float()
    weight = torch.ones_like(target)
    weight[0, 0] = 0  # sample 0 has no lung label
    weight[1, :, ..., :16] = 0  # sample 1: the left half is padding
    loss, _ = spec.loss()(outputs, target, 0.5, weight=weight)
    loss.backward()
    grad = outputs["logits"].grad
    assert torch.isfinite(loss) and grad[0, 0].abs().max() == 0 and grad[1, :, ..., :16].abs().max() == 0
    assert grad[0, 1].abs().max() > 0 and grad[1, :, ..., 16:].abs().max() > 0
    # flipping the unknown labels changes nothing
    flipped = target.clone()
    flipped[weight == 0] = 1 - flipped[weight == 0]
    again, _ = spec.loss()({k: (v.detach() if torch.is_tensor(v) else [t.detach() for t in v]) for k, v in outputs.items()},
                           flipped, 0.5, weight=weight)
    assert float(again) == pytest.approx(float(loss), rel=1e-5)


def test_mixed_folders_train_and_record_the_domain(tmp_path):
    from napari_covidseg.checkpoint import read_checkpoint_info
    from training.config import build_config
    from training.trainer import run_training

    a = _slice_folder(tmp_path / "a", n=6)
    cfg = build_config(None, network="unet", data=[f"{a},labels=infection", "phantom,cases=3"], out=str(tmp_path / "run"),
                       epochs=1, batch_size=2, input_size=[32, 32], samples_per_epoch=4, phantom_shape=[4, 32, 32],
                       network_kwargs={"base": 4}, val_fraction=0.3)
    code, status = run_training(cfg)
    assert (code, status) == (0, "finished")
    info = read_checkpoint_info(tmp_path / "run" / "best.pt")
    assert info["preprocessing"]["domain"] == "display8" and info["training"]["domain"] == "display8"
    assert info["training"]["domains"] == {"display8": 6, "hu": 3}
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train only the labels they have" in log


def test_hu_only_training_refuses_8bit_cases(tmp_path):
    from training.config import build_config
    from training.trainer import run_training

    cfg = build_config(None, network="unet", data=[str(_slice_folder(tmp_path / "a")), "phantom,cases=2"], domain="hu",
                       out=str(tmp_path / "run"), epochs=1, input_size=[32, 32], phantom_shape=[4, 32, 32],
                       network_kwargs={"base": 4})
    code, message = run_training(cfg)
    assert code == 2 and "HU cannot be recovered" in message
