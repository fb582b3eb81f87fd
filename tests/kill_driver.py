"""Kill a training run at chosen points and resume it (run by tests/test_recovery.py in a subprocess).

    python tests/kill_driver.py PLAN.json RESULT.json

The plan is ``{"args": [...train arguments...], "reference": out_dir, "out": out_dir, "runs": [scenario, ...]}``.
The driver imports torch and ``training`` once, then forks one child per run (so a run costs its
training, not a Python start-up): the reference run, then each scenario on ``out`` with
``--resume auto``.  A scenario kills its child with ``os._exit(137)`` (no clean-up code runs, as
after SIGKILL) at a point of its choice:

* ``{"kill": "step", "n": N}``: after the N-th optimizer step of that run;
* ``{"kill": "sigterm", "n": N}``: SIGTERM to itself after the N-th step (a clean stop, not a kill);
* ``{"kill": "save", "target": "last.pt", "n": N, "phase": P}``: in the N-th write of ``target``:
  ``"during"`` (half the bytes written), ``"before_replace"`` (written, not yet renamed) or
  ``"after_replace"`` (renamed, nothing after it done);
* ``{"kill": "record", "n": N}``: just before the N-th epoch record reaches metrics.jsonl;
* ``{"kill": "external", "delay": S}``: SIGKILL from the driver S seconds after the fork;
* ``{"kill": None}``: run to the end.

The result holds each run's exit status (``"exit N"`` or ``"signal N"``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time


def _die() -> None:
    os._exit(137)


def _patch_steps(scenario: dict) -> None:
    import torch

    real_step = torch.amp.GradScaler.step
    count = {"n": 0}

    def step(self, optimizer, *args, **kwargs):
        out = real_step(self, optimizer, *args, **kwargs)
        count["n"] += 1
        if count["n"] == scenario["n"]:
            if scenario["kill"] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                _die()
        return out

    torch.amp.GradScaler.step = step


def _patch_saves(scenario: dict) -> None:
    import torch

    target, phase = f".{scenario['target']}.", scenario["phase"]
    count = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", str(f))
        if target in os.path.basename(str(name)):
            count["n"] += 1
            if count["n"] == scenario["n"] and phase == "during":
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                _die()
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        hit = target in os.path.basename(str(src)) and count["n"] == scenario["n"]
        if hit and phase == "before_replace":
            _die()
        out = real_replace(src, dst, *args, **kwargs)
        if hit and phase == "after_replace":
            _die()
        return out

    torch.save = save
    os.replace = replace


def _patch_records(scenario: dict) -> None:
    from training.metrics_log import MetricsLog

    real_record = MetricsLog.record
    count = {"n": 0}

    def record(self, event, **fields):
        if event == "epoch":
            count["n"] += 1
            if count["n"] == scenario["n"]:
                _die()
        return real_record(self, event, **fields)

    MetricsLog.record = record


def _child(args, scenario: dict) -> None:
    kill = scenario.get("kill")
    if kill in ("step", "sigterm"):
        _patch_steps(scenario)
    elif kill == "save":
        _patch_saves(scenario)
    elif kill == "record":
        _patch_records(scenario)
    from training.cli import main

    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args, scenario: dict) -> str:
    pid = os.fork()
    if pid == 0:
        try:
            _child(args, scenario)
        finally:
            os._exit(99)
    if scenario.get("kill") == "external":
        time.sleep(float(scenario["delay"]))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"


def main(plan_path: str, result_path: str) -> None:
    import torch  # noqa: F401  (imported once, before the forks)

    import training.cli  # noqa: F401
    import training.trainer  # noqa: F401

    with open(plan_path) as stream:
        plan = json.load(stream)
    result = {"reference": _run(plan["args"] + ["--out", plan["reference"]], {"kill": None}), "runs": []}
    for scenario in plan["runs"]:
        status = _run(plan["args"] + ["--out", plan["out"], "--resume", "auto"], scenario)
        result["runs"].append({"scenario": scenario, "status": status})
    with open(result_path, "w") as stream:
        json.dump(result, stream, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
