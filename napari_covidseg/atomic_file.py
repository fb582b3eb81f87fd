"""Writing a file so that it appears whole or not at all.

The content is written under a temporary name in the target's own folder (so the final rename
stays on one file system and is atomic), then renamed over the target.  A crash, a full disk or
an exception while writing leaves the target untouched and no temporary file behind.  A process
killed outright (SIGKILL, power loss) cannot clean up: its temporary file (``.<name>.<random><suffix>``)
stays, and is removed by the next write of the same target once it is :data:`STALE_SECONDS` old,
or at once by :func:`sweep_temporaries` (e.g. by a training run, which owns its output folder).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

#: a temporary file of a killed writer this old is surely no live write's any more
STALE_SECONDS = 3600.0


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
    sweep_temporaries(path.parent, [path.name], suffix, older_than=STALE_SECONDS)
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


def sweep_temporaries(folder, names: Iterable[str], suffix: str = ".tmp", older_than: float = 0.0) -> List[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` for the targets ``names`` (a
    writer killed before it could clean up) that are at least ``older_than`` seconds old; returns them."""
    folder = Path(folder)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    prefixes = tuple(f".{name}." for name in names)
    for entry in entries:
        if not (entry.name.startswith(prefixes) and entry.name.endswith(suffix)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime >= older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed
