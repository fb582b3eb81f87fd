"""Pack what a lent GPU machine needs to train the shipped networks, small enough to travel.

    python -m benchmarks.gpu_pack            # writes .gpupack/data.tar.xz and .gpupack/site.tar.xz

The session's ``device`` tool sends the working tree, 64 MiB in all, to a bare machine with CUDA
PyTorch but no nibabel and no ``../shared/data``.  This packs

* ``data.tar.xz``: the training and validation cases of ``benchmarks/real_data_split.json`` (never
  the held-out test cases) of the two 8-bit sets, as uncompressed NIfTI inside xz (46.5 MB, where
  the same files as .nii.gz take 54 MB), every folder of each case, with each set's csv files;
* ``site.tar.xz``: the nibabel package of this environment without its tests (0.3 MB).

``.gpupack`` is git-ignored (``.git/info/exclude``); name it in the call's ``carry`` and run
``bash benchmarks/gpu_train_all.sh .gpupack $OUT MINUTES``, which unpacks it there.  The shared
data's licences (non-commercial research) travel with it unchanged; nothing is published.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

from .real_data_split import DSTAROFF, INFNET, SPLIT_PATH
from .train_real_weights import DATA_ROOT

OUT = Path(__file__).resolve().parent.parent / ".gpupack"
SETS = (DSTAROFF, INFNET)


def training_files(data_root: Path = DATA_ROOT, split_path: Path = SPLIT_PATH):
    """(path, name in the archive) of every file the GPU runs read: the sets' csv files and the
    NIfTI files of the split's training and validation cases (``.nii.gz`` named ``.nii``)."""
    split = json.loads(Path(split_path).read_text())
    keep = set(split["train"]) | set(split["val"])
    for set_name in SETS:
        root = Path(data_root) / set_name
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            yield path, f"d/{set_name}/{path.name}"
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(folder.glob("*.nii.gz")):
                if f"{set_name}/{path.name[:-len('.nii.gz')]}" in keep:
                    yield path, f"d/{set_name}/{folder.name}/{path.name[:-len('.gz')]}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(mtime)
    tar.addfile(info, io.BytesIO(data))


def pack_data(out: Path, data_root: Path = DATA_ROOT, split_path: Path = SPLIT_PATH) -> int:
    """Write ``out`` (tar.xz); returns the number of files."""
    count = 0
    with tarfile.open(out, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for path, name in training_files(data_root, split_path):
            raw = path.read_bytes()
            _add_bytes(tar, name, gzip.decompress(raw) if path.name.endswith(".gz") else raw, path.stat().st_mtime)
            count += 1
    return count


def pack_nibabel(out: Path) -> None:
    import nibabel

    package = Path(nibabel.__file__).parent
    with tarfile.open(out, "w:xz", preset=9) as tar:
        tar.add(package, arcname="site/nibabel",
                filter=lambda info: None if "/tests" in info.name or "__pycache__" in info.name else info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for data.tar.xz and site.tar.xz")
    args = parser.parse_args(argv)
    if not (DATA_ROOT / DSTAROFF).is_dir():
        print(f"error: {DATA_ROOT / DSTAROFF} is missing (../shared/data)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    files = pack_data(args.out / "data.tar.xz")
    pack_nibabel(args.out / "site.tar.xz")
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.out.glob("*.tar.xz"))}
    print(f"packed {files} files into {args.out}: {sizes} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
