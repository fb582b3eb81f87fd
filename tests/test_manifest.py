"""The npe2 manifest is valid and every command it declares resolves to real code."""

import importlib
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parent.parent


def manifest():
    return npe2.PluginManifest.from_file(ROOT / "napari.yaml")


def test_package_ships_the_top_level_manifest():
    packaged = ROOT / "napari_covidseg" / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()


@pytest.mark.parametrize("command", [c.id for c in manifest().contributions.commands])
def test_every_command_resolves(command):
    cmd = next(c for c in manifest().contributions.commands if c.id == command)
    module, attr = cmd.python_name.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_reader_writer_sample_and_widgets_are_declared():
    contrib = manifest().contributions
    assert any("*.nii.gz" in r.filename_patterns for r in contrib.readers)
    assert {w.layer_types[0] for w in contrib.writers} == {"labels", "image"}
    assert {s.key for s in contrib.sample_data} >= {"chest_phantom"}
    titles = {w.display_name for w in contrib.widgets}
    for expected in ("Segment", "Compare to ground truth", "Correct and save", "Quantify", "Side by side", "Train",
                     "CT window presets"):
        assert expected in titles


def test_every_network_ships_weights_and_the_package_stays_small():
    from napari_covidseg.checkpoint import available_shipped
    from napari_covidseg.models import network_names

    assert sorted(available_shipped()) == sorted(network_names())
    package = ROOT / "napari_covidseg"
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 60 * 2**20, f"package is {size / 2**20:.1f} MiB"
