"""Checkpoint format: round trips, fp16 shipped weights, and the messages users get for bad files."""

import os

import numpy as np
import pytest
import torch

from napari_covidseg import checkpoint as ckpt
from napari_covidseg.checkpoint import (
    available_shipped,
    load_checkpoint,
    load_shipped,
    read_checkpoint_info,
    save_checkpoint,
    shipped_checkpoint_path,
)
from napari_covidseg.errors import CheckpointError
from napari_covidseg.models import get_network, network_names
from napari_covidseg.preprocessing import Preprocessing

from checkpoint_helpers import craft, write_malicious

SMALL_UNET = {"base": 4, "depth": 2}


def _unet(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = get_network("unet").create(**(kwargs or SMALL_UNET))
    # non-trivial BatchNorm statistics so that they are checked too
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _unet()
    path = save_checkpoint(
        tmp_path / "unet.pt", model, "unet", SMALL_UNET,
        preprocessing=Preprocessing(hu_min=-1000, hu_max=400, normalisation="zscore"),
        training={"source": "phantom", "n_cases": 3, "split": {"train": ["a", "b"], "val": ["c"]}, "epochs_done": 2},
        metrics={"val_dice": {"lung": 0.9, "infection": np.float32(0.5)}},
        extra={"optimizer": torch.optim.Adam(model.parameters()).state_dict(), "numpy_rng": np.random.get_state(),
               "tuple": (1, 2)},
    )
    return path, model


def test_round_trip_restores_everything(saved):
    path, model = saved
    loaded = load_checkpoint(path, expected_network="unet")
    assert loaded.network == "unet" and loaded.spec is get_network("unet")
    assert loaded.network_kwargs == SMALL_UNET
    assert loaded.preprocessing == Preprocessing(hu_min=-1000, hu_max=400, normalisation="zscore")
    assert loaded.training["n_cases"] == 3 and loaded.training["split"]["val"] == ["c"]
    assert loaded.metrics["val_dice"]["infection"] == pytest.approx(0.5)
    assert not loaded.model.training
    assert loaded.raw["format"] == "napari-covidseg-checkpoint" and loaded.raw["format_version"] == 1
    x = torch.randn(2, 1, 40, 36)
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], loaded.model(x)["logits"])


def test_file_loads_with_weights_only_and_is_written_atomically(saved, tmp_path):
    path, _ = saved
    raw = torch.load(path, weights_only=True)  # plain types only: safe to open
    assert raw["network"] == "unet" and isinstance(raw["created"], str)
    assert type(raw["torch_version"]) is str
    assert sorted(os.listdir(tmp_path)) == ["unet.pt"]  # no temporary file left behind


def test_read_info_without_building(saved):
    path, model = saved
    info = read_checkpoint_info(path)
    assert info["network"] == "unet" and info["known_network"]
    assert info["network_kwargs"] == SMALL_UNET
    assert info["metrics"]["val_dice"]["lung"] == pytest.approx(0.9)
    assert info["training"]["source"] == "phantom"
    assert info["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["weights_dtype"] == "float32"


def test_fp16_checkpoint_is_half_the_size_and_close(tmp_path):
    model = _unet(1)
    full = save_checkpoint(tmp_path / "full.pt", model, "unet", SMALL_UNET)
    half = save_checkpoint(tmp_path / "half.pt", model, "unet", SMALL_UNET, half=True)
    assert os.path.getsize(half) < 0.7 * os.path.getsize(full)
    assert read_checkpoint_info(half)["weights_dtype"] == "float16"
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a, b = torch.sigmoid(model(x)["logits"]), torch.sigmoid(loaded.model(x)["logits"])
    assert torch.allclose(a, b, atol=5e-3)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="damaged or not a napari-covidseg checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint_info(path)


def test_truncated_checkpoint(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or not a napari-covidseg checkpoint"):
        load_checkpoint(cut)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    """Payloads that would create a marker file (os.system, exec, eval, open) hidden in a field, the
    weights, the top level, a plain pickle and torch's legacy format: all refused, nothing runs, and
    the message warns against weights_only=False instead of ending on torch's advice to use it."""
    marker = tmp_path / "PWNED"
    files = write_malicious(tmp_path / "evil", marker)
    assert len(files) >= 8
    for name, path in files.items():
        for reader in (load_checkpoint, read_checkpoint_info):
            with pytest.raises(CheckpointError) as info:
                reader(path)
            message = str(info.value)
            assert "Traceback" not in message and "\n" not in message, name
            assert " was refused: " in message or "damaged" in message, (name, message)
            if " was refused: " in message:
                assert "Nothing from it was run" in message and "Do not open it with torch.load(weights_only=False)" in message
            assert not message.rstrip().endswith("`weights_only` set to `False`"), name
            assert not marker.exists(), f"{name}: code from the file ran"
    # the zip-format payloads are named in the message (which global they need)
    with pytest.raises(CheckpointError, match=r"refused: it holds Python objects \(posix.system\)"):
        load_checkpoint(files["os_system_in_training"])
    # a class of this very package is refused too: checkpoints hold plain values only
    path = tmp_path / "object.pt"
    torch.save({"format": "napari-covidseg-checkpoint", "payload": Preprocessing()}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*napari_covidseg.preprocessing.Preprocessing"):
        load_checkpoint(path)


def test_wrong_format_and_bare_state_dict(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else", "network": "unet", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="format is 'something-else'"):
        load_checkpoint(path)
    bare = tmp_path / "bare.pt"
    torch.save(_unet().state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(bare)


def test_newer_format_version(saved, tmp_path):
    path, _ = saved
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_unknown_network_lists_known_ones(saved, tmp_path):
    path, _ = saved
    raw = torch.load(path, weights_only=True)
    raw["network"] = "resnet_from_mars"
    craft(raw, tmp_path / "mars.pt")
    with pytest.raises(CheckpointError, match="'resnet_from_mars'.*known networks: .*unet") as info:
        load_checkpoint(tmp_path / "mars.pt")
    assert all(name in str(info.value) for name in network_names())
    assert read_checkpoint_info(tmp_path / "mars.pt")["known_network"] is False


def test_expected_network_mismatch(saved, monkeypatch):
    path, _ = saved
    with pytest.raises(CheckpointError, match="this checkpoint holds an `unet`, not a `ms_unet`"):
        load_checkpoint(path, expected_network="ms_unet")


def test_state_dict_of_another_architecture(tmp_path):
    # weights of a wider U-Net stored under the small one's kwargs: shapes differ
    wide = _unet(0, base=8, depth=2)
    save_checkpoint(tmp_path / "w.pt", wide, "unet", SMALL_UNET)
    with pytest.raises(CheckpointError, match=r"do not fit the `unet` network.*weights of another shape") as info:
        load_checkpoint(tmp_path / "w.pt")
    assert len(str(info.value)) < 600  # summarised, not dumped
    # a deeper U-Net: extra keys
    deep = _unet(0, base=4, depth=3)
    save_checkpoint(tmp_path / "d.pt", deep, "unet", SMALL_UNET)
    with pytest.raises(CheckpointError, match=r"unexpected weights .* and \d+ more") as info:
        load_checkpoint(tmp_path / "d.pt")
    assert len(str(info.value)) < 800
    # missing keys
    raw = torch.load(tmp_path / "w.pt", weights_only=True)
    raw["state_dict"] = {k: v for k, v in _unet().state_dict().items() if "head" not in k}
    craft(raw, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="2 missing weights"):
        load_checkpoint(tmp_path / "m.pt")


def test_bad_constructor_kwargs(tmp_path):
    save_checkpoint(tmp_path / "k.pt", _unet(), "unet", {"base": 4, "depth": 2, "colour": "blue"})
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_checkpoint(tmp_path / "k.pt")


def test_unstorable_value_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        save_checkpoint(tmp_path / "x.pt", _unet(), "unet", SMALL_UNET, training={"obj": object()})
    assert not any(tmp_path.iterdir())


def test_shipped_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", tmp_path)
    assert shipped_checkpoint_path("unet") is None and available_shipped() == []
    with pytest.raises(CheckpointError, match="no shipped weights for `unet`"):
        load_shipped("unet")
    with pytest.raises(CheckpointError, match="unknown network"):
        load_shipped("nope")
    save_checkpoint(tmp_path / "unet.pt", _unet(), "unet", SMALL_UNET, half=True)
    assert shipped_checkpoint_path("unet") == tmp_path / "unet.pt"
    assert available_shipped() == ["unet"]
    assert load_shipped("unet").network == "unet"


def test_real_shipped_weights_load():
    """Whatever weights ship with the package load and run (none yet is fine)."""
    for name in available_shipped():
        loaded = load_shipped(name)
        assert loaded.network == name
        size = (32, 32) if loaded.spec.dims == 2 else (16, 32, 32)
        with torch.no_grad():
            logits = loaded.model(torch.zeros((1, 1) + size))["logits"]
        assert logits.shape == (1, 2) + size and torch.isfinite(logits).all()


def test_fp16_keeps_values_float16_cannot_hold(tmp_path):
    """A BatchNorm running variance above 65504 must not become inf in a half checkpoint."""
    model = _unet(1)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(1e6)
    model.eval()
    half = save_checkpoint(tmp_path / "half.pt", model, "unet", SMALL_UNET, half=True)
    loaded = load_checkpoint(half)
    for key, value in loaded.model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a, b = torch.sigmoid(model(x)["logits"]), torch.sigmoid(loaded.model(x)["logits"])
    assert torch.allclose(a, b, atol=5e-3)
