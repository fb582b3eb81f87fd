"""Which weights a user can choose for each network: the shipped ones and their own checkpoints.

The Segment and Side-by-side widgets list, per network, the weights shipped with the package
(``napari_covidseg/weights/<network>.pt``) followed by checkpoints the user trained or opened.
When the Training widget finishes a run it calls :func:`add_checkpoint`; every widget that
registered with :func:`on_change` refreshes its list, so the new checkpoint is choosable at once.

Recently used checkpoints are remembered across sessions in a small JSON file,
``<config dir>/checkpoints.json`` (``~/.config/napari-covidseg`` by default, or
``$COVIDSEG_CONFIG_DIR``; ``$XDG_CONFIG_HOME`` is honoured).  Only paths are stored; a file that
has disappeared is silently dropped from the list.  No Qt here: the widgets wrap it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .atomic_file import atomic_path
from .errors import CheckpointError
from .training_history import describe_training, training_legs

LOG = logging.getLogger(__name__)

CONFIG_ENV = "COVIDSEG_CONFIG_DIR"
CATALOG_FILE = "checkpoints.json"
MAX_REMEMBERED = 30

_callbacks: List[Callable[[], None]] = []
_user_paths: Optional[List[str]] = None  # most recent first; None until read from disk
_info_cache: Dict[str, tuple] = {}  # path -> (mtime, size, info)


@dataclass(frozen=True)
class WeightsEntry:
    """One choosable set of weights for one network."""

    network: str
    path: str
    shipped: bool
    label: str
    info: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def description(self) -> str:
        return describe(self.info, shipped=self.shipped)


# ------------------------------------------------------------------------------------------------
# persistence
# ------------------------------------------------------------------------------------------------
def config_dir() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "napari-covidseg"


def catalog_path() -> Path:
    return config_dir() / CATALOG_FILE


def _load_paths() -> List[str]:
    global _user_paths
    if _user_paths is None:
        paths: List[str] = []
        try:
            content = json.loads(catalog_path().read_text(encoding="utf-8"))
            for item in content.get("checkpoints", []):
                path = item.get("path") if isinstance(item, dict) else item
                if isinstance(path, str) and path not in paths:
                    paths.append(path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:  # a damaged file must not break the GUI
            LOG.warning("ignoring unreadable checkpoint list %s: %s", catalog_path(), exc)
        _user_paths = paths
    return _user_paths


def _save_paths(paths: List[str]) -> None:
    """Write the list atomically; failing to remember is logged, never fatal."""
    target = catalog_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = {"checkpoints": [{"path": p} for p in paths[:MAX_REMEMBERED]], "saved": time.time()}
        with atomic_path(target, suffix=".json") as tmp:
            tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    except OSError as exc:
        LOG.warning("could not remember checkpoints in %s: %s", target, exc)


def reset(forget_memory: bool = True) -> None:
    """Re-read the list from disk on next use (tests; a changed ``$COVIDSEG_CONFIG_DIR``)."""
    global _user_paths
    _user_paths = None
    if forget_memory:
        _info_cache.clear()


# ------------------------------------------------------------------------------------------------
# observers
# ------------------------------------------------------------------------------------------------
def on_change(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback()`` whenever the catalog changes; returns a function that unregisters it."""
    _callbacks.append(callback)

    def disconnect() -> None:
        if callback in _callbacks:
            _callbacks.remove(callback)

    return disconnect


def _notify() -> None:
    for callback in list(_callbacks):
        try:
            callback()
        except RuntimeError as exc:  # e.g. a closed widget whose Qt object is gone
            LOG.debug("dropping dead catalog observer: %s", exc)
            _callbacks.remove(callback)


# ------------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------------
def checkpoint_info(path) -> dict:
    """:func:`read_checkpoint_info`, cached while the file is unchanged."""
    from .checkpoint import read_checkpoint_info

    key = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(key)
    except OSError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the path") from None
    cached = _info_cache.get(key)
    if cached and cached[0] == stat.st_mtime_ns and cached[1] == stat.st_size:
        return cached[2]
    info = read_checkpoint_info(key)
    _info_cache[key] = (stat.st_mtime_ns, stat.st_size, info)
    return info


def _label_for(info: dict, path: str) -> str:
    """``run/best.pt (lung 0.97, infection 0.78)``: per-class Dice where stored (a mean hides a failing class)."""
    p = Path(path)
    name = p.name if p.parent.name in ("", ".") else f"{p.parent.name}/{p.name}"
    metrics = info.get("metrics") or {}
    block = metrics.get("val") if isinstance(metrics.get("val"), dict) else metrics
    per_class = [f"{cls} {float(block[cls]['dice']):.2f}" for cls in ("lung", "infection")
                 if isinstance(block.get(cls), dict) and isinstance(block[cls].get("dice"), (int, float))]
    if per_class:
        return f"{name} ({', '.join(per_class)})"
    dice = _mean_dice(metrics)
    return f"{name} (Dice {dice:.2f})" if dice is not None else name


def _mean_dice(metrics: dict) -> Optional[float]:
    for key in ("val_dice_mean", "dice_mean", "mean_dice"):
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    values = []
    for cls in ("lung", "infection"):
        entry = metrics.get(cls)
        if isinstance(entry, dict) and isinstance(entry.get("dice"), (int, float)):
            values.append(float(entry["dice"]))
    return sum(values) / len(values) if values else None


def shipped_entry(network: str) -> Optional[WeightsEntry]:
    from .checkpoint import shipped_checkpoint_path

    path = shipped_checkpoint_path(network)
    if path is None:
        return None
    try:
        info = checkpoint_info(path)
    except CheckpointError as exc:
        LOG.warning("shipped weights for %s are unreadable: %s", network, exc)
        return None
    return WeightsEntry(network=network, path=str(path), shipped=True, label="Shipped weights", info=info)


def user_entries(network: Optional[str] = None) -> List[WeightsEntry]:
    """Remembered checkpoints (most recent first), optionally only those of ``network``."""
    entries = []
    for path in list(_load_paths()):
        try:
            info = checkpoint_info(path)
        except CheckpointError:
            continue  # moved or deleted since; it stays in the file until the list is rewritten
        if network is not None and info.get("network") != network:
            continue
        entries.append(WeightsEntry(network=str(info.get("network")), path=path, shipped=False,
                                    label=_label_for(info, path), info=info))
    return entries


def entries(network: str) -> List[WeightsEntry]:
    """Everything choosable for ``network``: shipped weights first, then the user's checkpoints."""
    shipped = shipped_entry(network)
    return ([shipped] if shipped else []) + user_entries(network)


def default_entry(network: str) -> Optional[WeightsEntry]:
    found = entries(network)
    return found[0] if found else None


def add_checkpoint(path) -> WeightsEntry:
    """Register a checkpoint (after checking it is one) and tell every observer.

    Raises :class:`CheckpointError` (with the reason) when the file is not a usable checkpoint
    or holds a network this version does not know.
    """
    key = os.path.abspath(os.fspath(path))
    info = checkpoint_info(key)
    if not info.get("known_network"):
        raise CheckpointError(
            f"{key} holds a network named {info.get('network')!r}, which this napari-covidseg does not know"
        )
    paths = _load_paths()
    if key in paths:
        paths.remove(key)
    paths.insert(0, key)
    del paths[MAX_REMEMBERED:]
    _save_paths(paths)
    _notify()
    return WeightsEntry(network=str(info["network"]), path=key, shipped=False, label=_label_for(info, key), info=info)


def remove_checkpoint(path) -> None:
    key = os.path.abspath(os.fspath(path))
    paths = _load_paths()
    if key in paths:
        paths.remove(key)
        _save_paths(paths)
        _notify()


# ------------------------------------------------------------------------------------------------
# text for tooltips
# ------------------------------------------------------------------------------------------------
def _class_metrics(metrics: dict, key: str) -> List[str]:
    """``lung: dice 0.970, ...`` parts of ``metrics[key]`` (``key`` "" = top level, as older files)."""
    block = metrics.get(key) if key else metrics
    parts = []
    for cls in ("lung", "infection"):
        entry = (block or {}).get(cls) if isinstance(block, dict) else None
        if isinstance(entry, dict):
            shown = [f"{k} {float(v):.3f}" for k, v in entry.items()
                     if isinstance(v, (int, float)) and k in ("dice", "iou", "sensitivity", "specificity")]
            if shown:
                parts.append(f"{cls}: " + ", ".join(shown[:2]))
    return parts


def _data_line(training: dict) -> Optional[str]:
    data = training.get("data") or training.get("data_source") or training.get("dataset") or training.get("layout")
    parts = []
    if data:
        names = [Path(str(d).split(",")[0]).name or str(d) for d in (data if isinstance(data, list) else [data])]
        parts.append("data: " + " + ".join(names))
    for key, label in (("n_cases", "cases"), ("cases", "cases"), ("n_train", "train cases"), ("n_val", "val cases")):
        value = training.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label}: {int(value)}")
        elif isinstance(value, list):
            parts.append(f"{label}: {len(value)}")
    for key in ("epochs_done", "epoch", "epochs"):
        if isinstance(training.get(key), (int, float)):
            parts.append(f"epochs: {int(training[key])}")
            break
    return ", ".join(parts) if parts else None


def _source_name(item) -> str:
    """``covid19ctseg_dstaroff`` for ``/data/covid19ctseg_dstaroff``; ``phantom`` for
    ``phantom: 17 cases, ...`` or ``phantom,weight=0.15``."""
    head = str(item).split(",")[0].strip()
    if head.split(":")[0].strip() == "phantom":
        return "phantom"
    return Path(head).name or head


def data_sources(info: dict) -> List[str]:
    """Names of the data the weights were trained on (folder names, ``phantom``)."""
    data = (info.get("training") or {}).get("data")
    items = data if isinstance(data, list) else [data] if data else []
    return [_source_name(d) for d in items]


def phantom_only(info: dict) -> bool:
    """True when the weights were trained on synthetic phantoms only (no patient CT)."""
    sources = data_sources(info)
    return bool(sources) and all(s == "phantom" for s in sources)


def describe(info: dict, shipped: bool = False) -> str:
    """A few lines saying what the weights are, what they read and how good they were on held-out data."""
    from .preprocessing import Preprocessing

    network = info.get("network", "?")
    lines = [("Shipped weights" if shipped else "Checkpoint") + f" for `{network}`"]
    if info.get("path"):
        lines.append(str(info["path"]))
    training = info.get("training") or {}
    data_line = _data_line(training)
    if data_line:
        lines.append(data_line + (" (synthetic phantoms only: not validated on patient CT)" if phantom_only(info) else ""))
    try:
        lines.append(Preprocessing.from_dict(info.get("preprocessing") or {}).describe_domains())
    except (TypeError, ValueError):
        lines.append("preprocessing settings unreadable")
    metrics = info.get("metrics") or {}
    test = _class_metrics(metrics, "test")
    val = _class_metrics(metrics, "val") or _class_metrics(metrics, "")
    mean = _mean_dice(metrics)
    if test:
        lines.append(f"held-out test ({metrics.get('test_set', 'test cases')}) " + "; ".join(test))
    if val:
        lines.append("validation " + "; ".join(val))
    elif mean is not None and not test:
        lines.append(f"validation mean Dice {mean:.3f}")
    elif not test:
        lines.append("no validation metrics stored")
    n_params = info.get("n_parameters")
    if isinstance(n_params, int) and n_params:
        lines.append(f"{n_params / 1e6:.2f} M parameters ({info.get('weights_dtype') or '?'})")
    if info.get("created"):
        lines.append(f"created {info['created']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# model card (the Segment widget's compact card and its details)
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """What a user must know before trusting a set of weights, short first.

    ``headline``: what it was trained on; ``warning``: why its results must not be trusted on
    patient CT (None when there is no such reason); ``reads``: which images it can segment;
    ``figures``: its best evidence (held-out test, else validation) per class; ``details``: all
    the rest, one fact a line (split, epochs, time, device, deviations from the paper...).
    """

    headline: str
    warning: Optional[str]
    reads: str
    figures: List[str]
    details: List[str]

    def text(self) -> str:
        lines = [self.headline] + ([self.warning] if self.warning else []) + [self.reads] + self.figures
        return "\n".join(lines + [""] + self.details)


def best_infection_dice(info: dict) -> Optional[float]:
    """Infection Dice on held-out test data, else on validation data, else None."""
    metrics = info.get("metrics") or {}
    for block in (metrics.get("test"), metrics.get("val"), metrics):
        entry = block.get("infection") if isinstance(block, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("dice"), (int, float)):
            return float(entry["dice"])
    return None


def _class_dice(block) -> str:
    parts = [f"{cls} Dice {float(block[cls]['dice']):.2f}" for cls in ("lung", "infection")
             if isinstance(block, dict) and isinstance(block.get(cls), dict)
             and isinstance(block[cls].get("dice"), (int, float))]
    return " · ".join(parts)


def _card_figures(metrics: dict, training: dict) -> List[str]:
    figures = []
    test = _class_dice(metrics.get("test"))
    if test:
        split = training.get("split") if isinstance(training.get("split"), dict) else {}
        n_test = len(split["test"]) if isinstance(split.get("test"), list) else None
        figures.append(f"Test ({metrics.get('test_set') or (f'{n_test} held-out cases' if n_test else 'held-out cases')}): {test}")
    infnet = metrics.get("infnet_test")
    if isinstance(infnet, dict) and isinstance(infnet.get("dice"), (int, float)):
        figures.append(f"Inf-Net test slices: infection Dice {float(infnet['dice']):.2f}")
    val = _class_dice(metrics.get("val") if isinstance(metrics.get("val"), dict) else metrics)
    epoch = metrics.get("epoch") or training.get("epochs_done")
    if val and not test:
        figures.append(f"Validation: {val}" + (f" (epoch {epoch})" if epoch else ""))
    elif not val and not test and _mean_dice(metrics) is not None:  # older files: one mean hides each class
        figures.append(f"Validation: mean Dice {_mean_dice(metrics):.3f} (per class not stored)")
    if not figures:
        figures.append("No validation or test figures stored with these weights.")
    return figures


def _card_details(info: dict, training: dict, metrics: dict) -> List[str]:
    details = []
    if training.get("data"):
        data = training["data"] if isinstance(training["data"], list) else [training["data"]]
        details.append("data: " + "; ".join(str(d) for d in data))
    if isinstance(training.get("domains"), dict):
        details.append("cases by kind: " + ", ".join(f"{k} {v}" for k, v in training["domains"].items()))
    split = training.get("split") if isinstance(training.get("split"), dict) else {}
    sizes = [f"{k} {len(split[k])}" for k in ("train", "val", "test") if isinstance(split.get(k), list)]
    if sizes or split.get("method"):
        details.append("split by case: " + ", ".join(sizes) + (f" ({split['method']})" if split.get("method") else ""))
    done, planned = training.get("epochs_done"), training.get("epochs_planned") or (training.get("recipe") or {}).get("epochs")
    if done is not None:
        last_leg = " (the last leg's best)" if len(training_legs(training)) > 1 else ""
        details.append(f"epochs: {done}" + (f" of {planned}" if planned else "") + last_leg)
    if training.get("wall_minutes") is not None:
        details.append(f"training: {describe_training(training)}")
    deviations = training.get("deviations_from_paper")
    if isinstance(deviations, dict) and deviations:
        details.append("changed from the paper: " + ", ".join(f"{k}={v}" for k, v in deviations.items()))
    for key, label in (("test", "test"), ("val", "validation")):
        parts = _class_metrics(metrics, key)
        if parts:
            details.append(f"{label}: " + "; ".join(parts))
    if training.get("note"):
        details.append(f"note: {training['note']}")
    return details


def model_card(info: dict, shipped: bool = False) -> ModelCard:
    """The :class:`ModelCard` of checkpoint ``info`` (``read_checkpoint_info``'s dict)."""
    from .preprocessing import Preprocessing

    training = info.get("training") or {}
    metrics = info.get("metrics") or {}
    sources = data_sources(info)
    counts = [f"{training[k]} {label}" for k, label in (("n_train", "train"), ("n_val", "val"))
              if isinstance(training.get(k), int)]
    headline = (("Shipped weights" if shipped else "Checkpoint") + ": trained on "
                + (" + ".join(sources) if sources else "unrecorded data")
                + (f" ({' / '.join(counts)} cases)" if counts else ""))
    warning = None
    if phantom_only(info):
        warning = "Synthetic phantoms only: not validated on patient CT."
    elif not sources:
        warning = "Training data not recorded: treat its results with care."
    try:
        reads = Preprocessing.from_dict(info.get("preprocessing") or {}).describe_domains()
    except (TypeError, ValueError):
        reads = "preprocessing settings unreadable"
    details = _card_details(info, training, metrics) + [reads]
    n_params = info.get("n_parameters")
    if isinstance(n_params, int) and n_params:
        details.append(f"{n_params / 1e6:.2f} M parameters ({info.get('weights_dtype') or '?'}), "
                       f"{json.dumps(info.get('network_kwargs') or {})}")
    if info.get("created"):
        details.append(f"created {info['created']}")
    if info.get("path"):
        details.append(str(info["path"]))
    return ModelCard(headline=headline, warning=warning, reads=reads.split(";")[0].strip(),
                     figures=_card_figures(metrics, training), details=details)
