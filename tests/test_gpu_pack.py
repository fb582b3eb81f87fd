"""The GPU pack holds the training and validation cases only, as uncompressed NIfTI in xz."""

import gzip
import json
import tarfile

from benchmarks.gpu_pack import pack_data, training_files
from benchmarks.real_data_split import DSTAROFF, INFNET


def _fake_data(root):
    for set_name, cases in ((DSTAROFF, ["cc01", "cc02", "cc05"]), (INFNET, ["0", "3", "12"])):
        (root / set_name).mkdir(parents=True)
        (root / set_name / "groups.csv").write_text("case,group\n")
        for folder in ("images", "infection"):
            (root / set_name / folder).mkdir()
            for case in cases:
                (root / set_name / folder / f"{case}.nii.gz").write_bytes(gzip.compress(f"{folder} {case}".encode()))
    split = {"train": [f"{DSTAROFF}/cc01", f"{INFNET}/0"], "val": [f"{DSTAROFF}/cc05", f"{INFNET}/12"],
             "test": [f"{DSTAROFF}/cc02", f"{INFNET}/3"]}
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def test_pack_leaves_the_test_cases_out_and_stores_plain_nifti(tmp_path):
    split = _fake_data(tmp_path / "data")
    names = [name for _, name in training_files(tmp_path / "data", split)]
    assert f"d/{DSTAROFF}/groups.csv" in names and f"d/{DSTAROFF}/images/cc01.nii" in names
    assert f"d/{INFNET}/infection/12.nii" in names
    assert not any("cc02" in n or n.endswith("/3.nii") for n in names)  # held-out cases never travel
    assert pack_data(tmp_path / "pack.tar.xz", tmp_path / "data", split) == len(names) == 2 + 2 * 2 * 2
    with tarfile.open(tmp_path / "pack.tar.xz") as tar:
        assert tar.extractfile(f"d/{DSTAROFF}/images/cc05.nii").read() == b"images cc05"
