"""The metrics log ``metrics.jsonl`` (format in ``docs/ARCHITECTURE.md``, tailed by the GUI) and the
text log ``train.log``.  Every record is one JSON line, flushed and fsynced as it is written.

A process killed while it wrote a line leaves a partial last line; :meth:`MetricsLog.repair` (run
when a training starts) cuts it, so every line of the file stays one whole JSON record."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import List, Optional


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class MetricsLog:
    """Appends records to ``<out>/metrics.jsonl`` and lines to ``<out>/train.log``.

    Disabled (writes nothing) on DDP ranks other than 0.
    """

    def __init__(self, out_dir, enabled: bool = True, echo=None):
        self.enabled = enabled
        self.echo = echo
        self.jsonl = Path(out_dir) / "metrics.jsonl"
        self.text = Path(out_dir) / "train.log"

    def repair(self) -> bool:
        """Cut a partial last line (a writer killed mid-line); True if there was one."""
        if not self.enabled or not self.jsonl.is_file():
            return False
        with open(self.jsonl, "rb+") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return False
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def records(self, event: Optional[str] = None) -> List[dict]:
        """The whole records in the file (of ``event`` only, when given); unreadable lines are skipped."""
        out = []
        try:
            lines = self.jsonl.read_bytes().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                rec = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out

    def record(self, event: str, **fields) -> dict:
        rec = _clean({"event": event, **fields})
        if self.enabled:
            with open(self.jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return rec

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.text, "a", encoding="utf-8") as fh:
            for ln in str(text).splitlines() or [""]:
                fh.write(f"{stamp} {ln}\n")
        if self.echo is not None:
            self.echo(text)
