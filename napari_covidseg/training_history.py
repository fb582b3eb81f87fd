"""How a checkpoint was trained, read from its ``training`` record, for model cards.

A run fine-tuned from other weights (``--init-from``) keeps what those weights record about their own
training under ``training["initialised_from"]["training"]``, and so on back to the run that started
from random weights.  Each run is one *leg*; the cards show every leg and the total time.  Pure
functions on plain dicts (checkpoints from older versions simply have one leg).
"""

from __future__ import annotations

from typing import List, Optional


def _number(value) -> Optional[float]:
    """``value`` as a float, or None (a checkpoint's record is read, not trusted)."""
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def training_legs(training: dict) -> List[dict]:
    """The training records of every leg, earliest first (the checkpoint's own record last)."""
    legs, record, seen = [], training, set()
    while isinstance(record, dict) and record and id(record) not in seen:
        seen.add(id(record))
        legs.append(record)
        origin = record.get("initialised_from")
        record = origin.get("training") if isinstance(origin, dict) else None
    return legs[::-1]


def trained_on(record: dict) -> str:
    """Where one leg ran: 'NVIDIA H200 shared by 5 runs' or 'cpu (2 threads)'."""
    if str(record.get("device", "")).startswith("cuda") or record.get("gpu"):
        shared = _number(record.get("runs_sharing_gpu"))
        return f"{record.get('gpu') or 'a CUDA GPU'}" + (f" shared by {shared:g} runs" if shared and shared > 1 else "")
    threads = _number(record.get("cpu_threads"))
    return f"{record.get('device') or '?'}" + (f" ({threads:g} thread{'s' if threads != 1 else ''})" if threads else "")


def leg_epochs(record: dict) -> Optional[int]:
    """Epochs the leg trained (its whole run, not only up to the exported best epoch)."""
    value = _number(record.get("epochs_trained", record.get("epochs_done")))
    return int(value) if value is not None else None


def total_minutes(training: dict) -> Optional[float]:
    """Training minutes over every leg (None when no leg recorded its time)."""
    minutes = [m for m in (_number(r.get("wall_minutes")) for r in training_legs(training)) if m is not None]
    return round(sum(minutes), 1) if minutes else None


def describe_legs(training: dict) -> str:
    """'24 epochs in 5.0 min on NVIDIA H200 shared by 5 runs (a 5.5-minute budget), then 17 epochs in ...'."""
    parts = []
    for record in training_legs(training):
        epochs, minutes = leg_epochs(record), _number(record.get("wall_minutes"))
        budget = _number(record.get("time_budget_minutes"))
        text = f"{epochs if epochs is not None else '?'} epochs"
        text += f" in {minutes:.1f} min" if minutes is not None else ""
        text += f" on {trained_on(record)}"
        text += f" (a {budget:g}-minute budget)" if budget else ""
        parts.append(text)
    return ", then ".join(parts)


def describe_training(training: dict) -> str:
    """:func:`describe_legs`, and for a fine-tuning chain the total time over its legs."""
    total = total_minutes(training)
    if len(training_legs(training)) > 1 and total is not None:
        return f"{describe_legs(training)}; {total:.1f} min in all, each leg fine-tuned from the one before"
    return describe_legs(training)
