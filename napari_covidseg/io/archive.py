"""A .zip of a DICOM series (or of slice images) unpacked into a temporary folder for reading.

:func:`extracted` checks the archive before writing anything (a valid zip, no encrypted member,
enough free space for what it declares), unpacks it with :mod:`zipfile`'s own path sanitising
(no member can land outside the temporary folder), and removes the folder when the block ends, so
nothing of the archive stays on disk.  The folder it yields is the archive's content root: a zip
that holds one top folder yields that folder.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from ..errors import InputError
from .volume import is_regular_file

#: members that are never content (macOS resource forks and folder settings)
_JUNK = ("__MACOSX/", ".DS_Store")


def _members(archive: zipfile.ZipFile, name: str) -> List[zipfile.ZipInfo]:
    members = [m for m in archive.infolist()
               if not m.is_dir() and not any(part in m.filename for part in _JUNK)]
    if not members:
        raise InputError(f"{name} is an empty zip archive: zip the folder of the CT series itself.")
    if any(m.flag_bits & 0x1 for m in members):
        raise InputError(f"{name} is password-protected: unzip it yourself and open the folder.")
    return members


def holds_dicom(path) -> bool:
    """Whether the zip ``path`` holds a DICOM Part 10 file (read from the archive, nothing unpacked)."""
    if not is_regular_file(path):  # a pipe would block
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.is_dir() or any(part in member.filename for part in _JUNK) or member.flag_bits & 0x1:
                    continue
                with archive.open(member) as stream:
                    head = stream.read(132)
                if head[128:132] == b"DICM":
                    return True
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError):
        return False
    return False


def content_root(folder: Path) -> Path:
    """``folder``, or the single sub-folder it consists of (repeatedly)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


@contextmanager
def extracted(path) -> Iterator[Path]:
    """The content of the zip ``path`` in a temporary folder that is removed afterwards."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path.name} is not a valid zip archive (truncated or another format renamed): "
                         "download or copy it again.")
    with tempfile.TemporaryDirectory(prefix="covidseg-zip-") as tmp:
        try:
            with zipfile.ZipFile(path) as archive:
                members = _members(archive, path.name)
                need = sum(m.file_size for m in members)
                free = shutil.disk_usage(tmp).free
                if need > free:
                    raise InputError(f"{path.name} unpacks to {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB "
                                     "are free in the temporary folder: unzip it elsewhere and open the folder.")
                for member in members:
                    archive.extract(member, tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise InputError(f"{path.name} could not be unpacked ({type(exc).__name__}: {exc}): the archive is "
                             "corrupt or uses an unsupported compression; unzip it yourself and open the folder.") from None
        yield content_root(Path(tmp))
