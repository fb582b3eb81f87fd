import os

import pytest

from napari_covidseg.atomic_file import atomic_path


def test_file_appears_whole_with_usual_permissions(tmp_path):
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing under the final name while writing
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_text("old")
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["mask.nii.gz"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permissions


def test_before_replace_can_refuse(tmp_path):
    target = tmp_path / "a.txt"

    def refuse():
        raise FileExistsError("appeared meanwhile")

    with pytest.raises(FileExistsError):
        with atomic_path(target, before_replace=refuse) as tmp:
            tmp.write_text("x")
    assert os.listdir(tmp_path) == []
