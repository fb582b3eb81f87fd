"""Writing a file so that it appears whole or not at all.

The content is written under a temporary name in the target's own folder (so the final rename
stays on one file system and is atomic), then renamed over the target.  A crash, a full disk or
an exception while writing leaves the target untouched and no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def new_file_mode(path: Path) -> int:
    """Permissions for the new file: those of the file it replaces, else the usual umask ones
    (``mkstemp`` creates 0600 files)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_path(path, suffix: str = ".tmp", before_replace: Optional[Callable[[], None]] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally it replaces ``path``.

    ``before_replace`` runs after the content is written and just before the rename (e.g. to
    refuse a target that appeared meanwhile by raising).  On any exception the temporary file is
    removed and the exception propagates.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp_name)
        if before_replace is not None:
            before_replace()
        os.chmod(tmp_name, new_file_mode(path))
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
