"""The ``covidseg`` console script: info output, exit codes, and ``view`` opening our layers."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg import cli

AFFINE = np.diag([-0.7, -0.8, 2.5, 1.0])


@pytest.fixture
def ct_file(tmp_path):
    ct = np.random.default_rng(0).integers(-1000, 400, size=(16, 12, 6)).astype(np.int16)
    ct[0, 0, 0], ct[1, 1, 1] = -1024, 1200
    path = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(ct, AFFINE), str(path))
    return path


@pytest.fixture
def mask_file(tmp_path):
    mask = np.zeros((16, 12, 6), np.uint8)
    mask[2:6, 2:6, 1:3] = 1
    mask[9:12, 2:6, 1:3] = 2
    path = tmp_path / "lungs.nii"
    nib.save(nib.Nifti1Image(mask, AFFINE), str(path))
    return path


def test_info_prints_shape_spacing_orientation_and_hu(ct_file, capsys):
    assert cli.main(["info", str(ct_file)]) == 0
    out = capsys.readouterr().out
    assert "6 x 12 x 16 (z, y, x)" in out
    assert "2.5 x 0.8 x 0.7 mm (z, y, x)" in out
    assert "orientation: LPS" in out
    assert "HU range:    -1024 .. 1200" in out
    assert "kind:        image" in out


def test_info_json_and_masks(mask_file, capsys):
    assert cli.main(["info", "--json", str(mask_file)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["kind"] == "labels"
    assert facts["labels"] == {"0": 16 * 12 * 6 - 32 - 24, "1": 32, "2": 24}
    assert facts["shape_zyx"] == [6, 12, 16] and facts["spacing_zyx_mm"] == [2.5, 0.8, 0.7]


def test_usage_errors_exit_2(capsys, tmp_path):
    assert cli.main([]) == 2
    assert "covidseg: error:" in capsys.readouterr().err
    assert cli.main(["info"]) == 2
    assert cli.main(["view"]) == 2  # neither files nor --sample
    assert "give at least one" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "nope.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


def test_view_refuses_a_mask_that_does_not_fit_the_ct(tmp_path, ct_file, capsys):
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), AFFINE), str(wrong))
    assert cli.main(["view", str(ct_file), str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidseg: error: ") and "wrong.nii.gz" in err and "do not belong together" in err


def test_segment_subcommand_is_registered(capsys):
    """`segment` ships with the package: its module imports, the parser has it, and it answers --help
    (this test used to pass when the sub-command disappeared)."""
    import napari_covidseg.cli_segment  # noqa: F401  (an import error must fail here, not hide the command)

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"view", "info", "segment"} <= set(commands)
    assert cli.main(["segment", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--network" in out and "--checkpoint" in out and "--out-dir" in out
    assert cli.main(["segment"]) == 2  # the CT and --out-dir are required


def test_view_parses_files_and_sample(monkeypatch, ct_file):
    calls = []
    monkeypatch.setattr(cli, "open_viewer", lambda files, sample, series=None: calls.append((list(files), sample)))
    monkeypatch.setattr("napari.run", lambda: None)
    assert cli.main(["view", str(ct_file), "--sample", "small"]) == 0
    assert cli.main(["view", "--sample"]) == 0
    assert calls == [([str(ct_file)], "small"), ([], "full")]


def test_open_viewer_loads_files_sample_and_window_widget(ct_file, mask_file, qtbot):
    viewer = cli.open_viewer([str(ct_file), str(mask_file)], sample="small", widgets=("CT window presets",))
    try:
        names = [layer.name for layer in viewer.layers]
        assert "chest" in names and "lungs" in names and "phantom CT" in names
        ct = viewer.layers["chest"]
        np.testing.assert_allclose(ct.scale, (2.5, 0.8, 0.7), rtol=1e-6)
        np.testing.assert_allclose(ct.contrast_limits, (-1350, 150))
        assert viewer.layers["lungs"].__class__.__name__ == "Labels"
        assert any("CT window presets" in name for name in viewer.window.dock_widgets)
    finally:
        viewer.close()
