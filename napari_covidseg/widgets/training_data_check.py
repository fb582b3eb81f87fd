"""What a training data folder holds, asked of ``python -m training check-data`` in a child
process (reading every volume of a large folder must not freeze napari).

The Train widget runs it from its Check button and before every launch: a folder with no usable
case is refused before a trainer starts, instead of failing after minutes of loading.  A folder
checked successfully is not checked again until its contents change.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

from qtpy.QtCore import QObject, QProcess, QProcessEnvironment, Signal

from ..training_run import child_environment


DOMAIN_LABELS = {"display8": "8-bit display images", "hu": "CT in HU"}


def _domain_text(key: str, info: dict) -> str:
    """``"8-bit display images: 14 cases, 1279 slices, voxel size a placeholder"``."""
    cases, known = int(info.get("cases", 0)), int(info.get("spacing_known", 0))
    spacing = ("real voxel size" if known == cases else "voxel size a placeholder" if known == 0
               else f"real voxel size in {known}")
    plural = "s" if cases != 1 else ""
    return f"{DOMAIN_LABELS.get(key, key)}: {cases} case{plural}, {info.get('slices', '?')} slices, {spacing}"


def summarise_data_report(report: dict) -> str:
    """A short text from ``python -m training check-data``'s JSON report (format of
    ``training.datasets.check_data``: ``layout``, ``n_cases``, ``n_groups``, ``cases`` with each
    case's ``labels`` and ``infection_voxels``, ``domains``, ``problems``)."""
    layout = report.get("layout", "?")
    cases = report.get("cases") if isinstance(report.get("cases"), list) else []
    n = report.get("n_cases", len(cases))
    text = f"{n} case{'s' if n != 1 else ''} found ({layout} layout"
    groups = report.get("n_groups")
    if isinstance(groups, int) and groups != n:
        text += f", {groups} patients"
    text += ")"
    if cases:
        counts = {name: sum(1 for c in cases if name in (c.get("labels") or [])) for name in ("lung", "infection")}
        text += f": lung masks {counts['lung']}/{len(cases)}, infection masks {counts['infection']}/{len(cases)}"
        empty = sum(1 for c in cases if "infection" in (c.get("labels") or []) and c.get("infection_voxels") == 0)
        if empty:
            text += f" ({empty} with no infection)"
        shapes = [c.get("shape") for c in cases if isinstance(c.get("shape"), list) and len(c.get("shape")) == 3]
        if shapes:
            slices = sum(int(s[0]) for s in shapes)
            text += f"; {slices} slices"
    text += "."
    domains = report.get("domains") if isinstance(report.get("domains"), dict) else {}
    if domains:
        text += "\n" + "; ".join(_domain_text(key, info) for key, info in domains.items()) + "."
    problems = report.get("problems") or []
    if problems:
        text += f"\n{len(problems)} problem(s): " + "; ".join(map(str, problems[:3]))
        if len(problems) > 3:
            text += " ..."
    return text


def environment() -> QProcessEnvironment:
    env = QProcessEnvironment()
    for key, value in child_environment().items():
        env.insert(key, value)
    return env


def _stamp(folder: str) -> tuple:
    """What changes when files are added to or removed from the folder (or its sub-folders)."""
    root = Path(folder)
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in [root, *root.iterdir()] if p.is_dir()))
    except OSError:
        return ()


class DataCheck(QObject):
    """``run(folder)`` checks a folder; ``finished(ok, text)`` says the result (in the GUI thread)."""

    finished = Signal(bool, str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.process: Optional[QProcess] = None
        self.folder = ""
        self._passed = {}  # folder -> (stamp, text) of checks that found usable cases

    def running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.NotRunning

    def passed_before(self, folder: str) -> Optional[str]:
        """The summary of an earlier successful check of ``folder``, if it has not changed since."""
        stamp, text = self._passed.get(folder, (None, None))
        return text if stamp is not None and stamp == _stamp(folder) else None

    def run(self, folder: str) -> None:
        if self.running():
            return
        self.folder = folder
        proc = QProcess(self)
        proc.setProcessEnvironment(environment())
        proc.setProcessChannelMode(QProcess.SeparateChannels)
        proc.finished.connect(lambda code, _status: self._done(proc, code))
        proc.errorOccurred.connect(lambda err: err == QProcess.FailedToStart and self._done(proc, -1))
        self.process = proc
        proc.start(sys.executable, ["-m", "training", "check-data", folder])

    def _done(self, proc: QProcess, code: int) -> None:
        out = bytes(proc.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(proc.readAllStandardError()).decode("utf-8", "replace").strip()
        if code != 0:
            reason = err.splitlines()[-1] if err else f"the check stopped with exit code {code}"
            self.finished.emit(False, "Problem: " + re.sub(r"^error:\s*", "", reason))
            return
        try:
            report = json.loads(out)
        except ValueError:
            self.finished.emit(False, "Problem: " + (out.strip()[:500] or "the check printed nothing"))
            return
        text = summarise_data_report(report)
        ok = int(report.get("n_cases") or len(report.get("cases") or [])) > 0
        if ok:
            self._passed[self.folder] = (_stamp(self.folder), text)
        self.finished.emit(ok, text if ok else "Problem: " + text)
