"""The weights catalog: shipped weights + registered checkpoints, persisted, with observers."""

import json
import os
import shutil

import pytest

from napari_covidseg import checkpoint
from napari_covidseg.errors import CheckpointError


def test_add_checkpoint_lists_persists_and_notifies(isolated_catalog, tiny_unet_checkpoints, tmp_path):
    catalog = isolated_catalog
    calls = []
    disconnect = catalog.on_change(lambda: calls.append(1))
    assert catalog.user_entries("unet") == []

    entry = catalog.add_checkpoint(tiny_unet_checkpoints["trained"])
    assert calls == [1]
    assert entry.network == "unet" and not entry.shipped
    assert entry.path == os.path.abspath(tiny_unet_checkpoints["trained"])
    assert "lung 0.90" in entry.label and "infection 0.10" in entry.label  # per class: a mean would hide a failing class
    assert "lung: dice 0.900" in entry.description
    assert "data: phantom" in entry.description

    catalog.add_checkpoint(tiny_unet_checkpoints["random"])
    paths = [e.path for e in catalog.entries("unet") if not e.shipped]
    assert paths == [os.path.abspath(tiny_unet_checkpoints["random"]), os.path.abspath(tiny_unet_checkpoints["trained"])]
    # registering again moves it to the front rather than duplicating it
    catalog.add_checkpoint(tiny_unet_checkpoints["trained"])
    paths = [e.path for e in catalog.user_entries("unet")]
    assert paths[0] == os.path.abspath(tiny_unet_checkpoints["trained"]) and len(paths) == 2

    stored = json.loads((tmp_path / "config" / "checkpoints.json").read_text())
    assert [c["path"] for c in stored["checkpoints"]] == paths
    # a new session reads the same list back
    catalog.reset()
    assert [e.path for e in catalog.user_entries("unet")] == paths
    assert catalog.user_entries("no-such-net") == []

    disconnect()
    catalog.remove_checkpoint(tiny_unet_checkpoints["random"])
    assert calls == [1, 1, 1]
    assert [e.path for e in catalog.user_entries()] == [paths[0]]


def test_shipped_weights_come_first(isolated_catalog, tiny_unet_checkpoints, tmp_path, monkeypatch):
    catalog = isolated_catalog
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_unet_checkpoints["random"], weights / "unet.pt")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", weights)
    catalog.add_checkpoint(tiny_unet_checkpoints["trained"])
    entries = catalog.entries("unet")
    assert [e.shipped for e in entries] == [True, False]
    assert entries[0].label == "Shipped weights" and "Shipped weights for `unet`" in entries[0].description
    assert catalog.default_entry("unet").shipped


def test_bad_files_are_refused_and_missing_ones_dropped(isolated_catalog, tiny_unet_checkpoints, tmp_path):
    catalog = isolated_catalog
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        catalog.add_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        catalog.add_checkpoint(tmp_path / "missing.pt")
    assert catalog.user_entries() == []

    moved = tmp_path / "moved.pt"
    shutil.copy(tiny_unet_checkpoints["trained"], moved)
    catalog.add_checkpoint(moved)
    assert len(catalog.user_entries("unet")) == 1
    moved.unlink()
    assert catalog.user_entries("unet") == []  # a deleted file is skipped, not an error


def test_damaged_catalog_file_is_ignored(isolated_catalog, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "checkpoints.json").write_text("{ not json")
    assert isolated_catalog.user_entries() == []


def test_config_dir_override(monkeypatch, tmp_path):
    from napari_covidseg import weights_catalog

    monkeypatch.setenv("COVIDSEG_CONFIG_DIR", str(tmp_path / "x"))
    assert weights_catalog.catalog_path() == tmp_path / "x" / "checkpoints.json"
    monkeypatch.delenv("COVIDSEG_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert weights_catalog.config_dir() == tmp_path / "xdg" / "napari-covidseg"
