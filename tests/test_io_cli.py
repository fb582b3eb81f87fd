"""`covidseg info / view / segment` with DICOM folders (series listed and chosen with --series),
NRRD and slice images: outputs in the CT's format on its grid, errors as one line and exit 2."""

import json

import numpy as np
import pytest

from io_helpers import cip_paths, write_study
from napari_covidseg import cli
from napari_covidseg.io import loader
from napari_covidseg.io.volume import check_same_grid

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("pydicom")


@pytest.fixture
def study(shared_data_dir, tmp_path):
    image = sitk.ReadImage(cip_paths(shared_data_dir)[0])
    folder = tmp_path / "study"
    write_study(folder, image)
    return folder, image


def test_info_lists_the_series_and_describes_the_chosen_one(study, capsys):
    folder, _ = study
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1. series 2 'Lung 4.0' (CT, 79 files)" in out and "2. series 6 'Part 4.0' (CT, 40 files)" in out
    assert "3. series 9 'T1' (MR, 12 files)" in out and "cannot be opened: its modality is MR" in out
    assert "--series" in out and "HU range" not in out
    assert cli.main(["info", str(folder), "--series", "2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "dicom" and facts["description"] == "series 6 'Part 4.0'"
    assert facts["shape_zyx"] == [40, 64, 64] and facts["orientation"] == "LPS" and facts["domain"] == "hu"
    assert len(facts["series"]) == 3 and facts["series"][2]["usable"] is False
    assert cli.main(["info", str(folder), "--series", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidseg: error: DICOM series 9 'T1'") and "not CT" in err and err.count("\n") == 1


def test_info_of_slices_says_8bit_and_placeholder_spacing(tmp_path, capsys):
    iio = pytest.importorskip("imageio.v3")
    (tmp_path / "png").mkdir()
    for k in range(3):
        iio.imwrite(tmp_path / "png" / f"s{k}.png", np.random.default_rng(k).integers(0, 256, (16, 20)).astype(np.uint8))
    assert cli.main(["info", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "8-bit display image (not HU)" in out and "a placeholder" in out and "format:      slices" in out


def test_view_reads_every_ct_series_or_the_chosen_one(study, capsys):
    folder, _ = study
    named = cli.read_for_view([str(folder)])
    assert [volume.description for _, volume in named] == ["series 2 'Lung 4.0'", "series 6 'Part 4.0'"]
    assert "not opened" in capsys.readouterr().err
    (only,) = cli.read_for_view([str(folder)], series="2")
    assert only[1].data.shape == (40, 64, 64)


def test_view_series_without_a_dicom_path_and_an_empty_folder_exit_2(study, tmp_path, capsys):
    folder, image = study
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    assert cli.main(["view", str(tmp_path / "ct.nrrd"), "--series", "1"]) == 2
    assert "--series chooses a DICOM series" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidseg: error: ") and "no slice images" in err and "Traceback" not in err


def _segment(argv):
    from napari_covidseg import cli_segment

    parser = cli.build_parser()
    return cli_segment.run(parser.parse_args(["segment"] + argv))


def test_segment_a_dicom_series_writes_nifti_masks_on_its_grid(study, tiny_unet_checkpoints, tmp_path, capsys):
    folder, _ = study
    out = tmp_path / "out"
    checkpoint = tiny_unet_checkpoints["random"]
    assert _segment([str(folder), "-c", checkpoint, "-o", str(out), "-q"]) == 2
    assert "holds 2 CT series" in capsys.readouterr().err
    assert _segment([str(folder), "--series", "1", "-c", checkpoint, "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["study_series1_unet_infection.nii.gz", "study_series1_unet_lung.nii.gz"]
    ct = loader.load_any(folder, series="1")
    lung = loader.load_any(out / "study_series1_unet_lung.nii.gz", kind="labels")
    check_same_grid(lung, ct)


def test_segment_an_nrrd_ct_writes_nrrd_masks(study, tiny_unet_checkpoints, tmp_path, capsys):
    _, image = study
    sitk.WriteImage(image, str(tmp_path / "chest.nrrd"))
    out = tmp_path / "out"
    checkpoint = tiny_unet_checkpoints["random"]
    assert _segment([str(tmp_path / "chest.nrrd"), "-c", checkpoint, "-o", str(out), "--probabilities"]) == 0
    assert "mL" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chest_unet_infection.nrrd", "chest_unet_infection_prob.nrrd", "chest_unet_lung.nrrd",
                     "chest_unet_lung_prob.nrrd"]
    ct = loader.load_any(tmp_path / "chest.nrrd")
    check_same_grid(loader.load_any(out / "chest_unet_lung.nrrd", kind="labels"), ct)
    prob = loader.load_any(out / "chest_unet_lung_prob.nrrd", check_hounsfield=False)
    assert prob.data.dtype == np.float32 and 0.0 <= prob.data.min() and prob.data.max() <= 1.0


def test_segment_passes_the_8bit_domain_of_slices_to_the_network(tiny_unet_checkpoints, tmp_path, capsys):
    iio = pytest.importorskip("imageio.v3")
    (tmp_path / "png").mkdir()
    for k in range(3):
        iio.imwrite(tmp_path / "png" / f"s{k}.png", np.random.default_rng(k).integers(0, 256, (16, 20)).astype(np.uint8))
    out = tmp_path / "out"
    # the tiny network learnt HU: an 8-bit image is refused with the reason, not read as HU
    assert _segment([str(tmp_path / "png"), "-c", tiny_unet_checkpoints["random"], "-o", str(out), "-q"]) == 2
    assert "HU cannot be recovered" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
