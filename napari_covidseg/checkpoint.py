"""The checkpoint format: one file that holds a trained network and everything needed to use it.

A checkpoint is a ``torch.save``d dict of plain Python types and tensors only, so that it loads
with ``torch.load(weights_only=True)``: opening a checkpoint somebody sent you never runs code
from the file.  Keys:

* ``format``: ``"napari-covidseg-checkpoint"``, ``format_version``: 1;
* ``network``: registry name (``napari_covidseg.models.network_names()``), ``network_kwargs``:
  the constructor arguments (so the same architecture is rebuilt);
* ``preprocessing``: :meth:`Preprocessing.to_dict` (the network is always fed the intensities it
  was trained on);
* ``state_dict``: the weights (optionally stored as float16 to keep shipped weights small;
  loading converts them back to float32);
* ``training``: a summary of how it was trained (data source, number of cases, split, recipe,
  epochs done); ``metrics``: e.g. validation Dice per class;
* ``created`` (ISO time, UTC), ``covidseg_version``, ``torch_version``;
* ``extra``: optimizer / scheduler / RNG states used by ``training`` to resume.

Files are written atomically (temporary file in the same folder, then ``os.replace``), so a crash
or a full disk never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import __version__
from .atomic_file import atomic_path
from .errors import CheckpointError
from .models.registry import NetworkSpec, get_network, network_names
from .preprocessing import Preprocessing

FORMAT_NAME = "napari-covidseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

PathLike = Union[str, os.PathLike]

_DAMAGED = "the file is damaged or not a napari-covidseg checkpoint"


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, in eval mode, with what is needed to run it."""

    model: nn.Module
    spec: NetworkSpec
    network: str
    network_kwargs: Dict[str, Any]
    preprocessing: Preprocessing
    training: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    path: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------
def _plain(value: Any, where: str) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` accepts (numbers, str, list, dict, tensor)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    # exact built-in types: subclasses (numpy scalars, TorchVersion, enums) are refused by weights_only
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, int) and not isinstance(k, bool) else str(k)): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (os.PathLike,)):
        return os.fspath(value)
    # numpy scalars / arrays without importing numpy here unconditionally
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a checkpoint; use numbers, strings, lists, dicts or tensors")


def _fits_float16(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 0 or float(tensor.abs().max()) <= float(torch.finfo(torch.float16).max)


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    network: str,
    network_kwargs: Optional[dict] = None,
    preprocessing: Optional[Preprocessing] = None,
    training: Optional[dict] = None,
    metrics: Optional[dict] = None,
    extra: Optional[dict] = None,
    half: bool = False,
) -> Path:
    """Write ``model`` and its description to ``path`` atomically; returns the path.

    ``preprocessing`` defaults to the registered network's own.  ``half=True`` stores floating
    weights as float16 (halves the file; used for the weights shipped with the package); a
    tensor with values float16 cannot hold (BatchNorm running variances can exceed 65504) stays
    float32, so no weight turns into inf.
    """
    spec = get_network(network)
    preprocessing = preprocessing if preprocessing is not None else spec.preprocessing
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point() and _fits_float16(tensor):
            tensor = tensor.half()
        state[key] = tensor.clone()
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network": network,
        "network_kwargs": _plain(dict(network_kwargs or {}), "network_kwargs"),
        "preprocessing": _plain(preprocessing.to_dict(), "preprocessing"),
        "state_dict": state,
        "training": _plain(dict(training or {}), "training"),
        "metrics": _plain(dict(metrics or {}), "metrics"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "covidseg_version": str(__version__),
        "torch_version": str(torch.__version__),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return path


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _read_raw(path: PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pick a .pt file")
    try:
        raw = torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError,
            AttributeError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
        reason = (detail or lines or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} ({reason[:200]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} (it holds a {type(raw).__name__}, not a dict)")
    fmt = raw.get("format")
    if fmt != FORMAT_NAME:
        hint = " (it looks like a bare state_dict)" if fmt is None and all(isinstance(v, torch.Tensor) for v in raw.values()) and raw else ""
        raise CheckpointError(
            f"{path} is not a napari-covidseg checkpoint: its format is {fmt!r}, expected {FORMAT_NAME!r}{hint}; "
            "save checkpoints with napari_covidseg.checkpoint.save_checkpoint or `python -m training train`"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format version {version!r}, this napari-covidseg reads up to {FORMAT_VERSION}; update napari-covidseg"
        )
    for key in ("network", "state_dict"):
        if key not in raw:
            raise CheckpointError(f"cannot read {path}: {_DAMAGED} (no {key!r} entry)")
    return raw


def _spec_for(raw: dict, path: PathLike, expected_network: Optional[str]) -> NetworkSpec:
    name = raw["network"]
    known = network_names()
    if name not in known:
        raise CheckpointError(
            f"{path} holds a network named {name!r}, which this napari-covidseg does not know; "
            f"known networks: {', '.join(known)}"
        )
    if expected_network is not None and name != expected_network:
        raise CheckpointError(
            f"this checkpoint holds an `{name}`, not a `{expected_network}` ({path}); "
            f"choose the `{name}` network or another checkpoint"
        )
    return get_network(name)


def _summarise_mismatch(model: nn.Module, state: dict) -> Optional[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shape):
        return None

    def few(keys: List[str]) -> str:
        shown = ", ".join(keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing weights ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights ({few(unexpected)})")
    if shape:
        k = shape[0]
        parts.append(
            f"{len(shape)} weights of another shape (e.g. {k}: file {tuple(state[k].shape)}, network {tuple(own[k].shape)})"
        )
    return "; ".join(parts)


def load_checkpoint(path: PathLike, expected_network: Optional[str] = None, map_location="cpu") -> LoadedModel:
    """Rebuild the network stored in ``path`` (eval mode, float32, on ``map_location``).

    Raises :class:`CheckpointError` with a message for the user when the file is missing,
    damaged, of another format, for an unknown or unexpected network, or when its weights do not
    fit the architecture its ``network_kwargs`` describe.
    """
    raw = _read_raw(path, map_location=map_location)
    spec = _spec_for(raw, path, expected_network)
    kwargs = dict(raw.get("network_kwargs") or {})
    try:
        model = spec.create(**kwargs)
    except TypeError as exc:
        raise CheckpointError(
            f"{path}: the `{spec.name}` network cannot be built with the stored arguments {kwargs} ({exc}); "
            "the checkpoint was probably made by another version of napari-covidseg"
        ) from None
    state = raw["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} (state_dict is a {type(state).__name__})")
    mismatch = _summarise_mismatch(model, state)
    if mismatch:
        raise CheckpointError(
            f"the weights in {path} do not fit the `{spec.name}` network built with {kwargs}: {mismatch}; "
            "the checkpoint was made for another architecture or version"
        )
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(map_location if map_location is not None else "cpu")
    model.float().eval()
    try:
        preprocessing = Preprocessing.from_dict(raw["preprocessing"]) if raw.get("preprocessing") else spec.preprocessing
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its preprocessing settings are invalid ({exc})") from None
    return LoadedModel(
        model=model,
        spec=spec,
        network=spec.name,
        network_kwargs=kwargs,
        preprocessing=preprocessing,
        training=dict(raw.get("training") or {}),
        metrics=dict(raw.get("metrics") or {}),
        raw=raw,
        path=str(path),
    )


def read_checkpoint_info(path: PathLike) -> dict:
    """What a checkpoint holds, without building the network (for lists in the GUI)."""
    raw = _read_raw(path, map_location="cpu")
    state = raw.get("state_dict") or {}
    n_params = int(sum(v.numel() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                       and not k.endswith(("running_mean", "running_var"))))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return {
        "path": str(path),
        "network": raw.get("network"),
        "known_network": raw.get("network") in network_names(),
        "network_kwargs": dict(raw.get("network_kwargs") or {}),
        "preprocessing": dict(raw.get("preprocessing") or {}),
        "training": dict(raw.get("training") or {}),
        "metrics": dict(raw.get("metrics") or {}),
        "created": raw.get("created"),
        "covidseg_version": raw.get("covidseg_version"),
        "torch_version": raw.get("torch_version"),
        "format_version": raw.get("format_version"),
        "n_parameters": n_params,
        "weights_dtype": ",".join(dtypes),
    }


# ------------------------------------------------------------------------------------------------
# weights shipped with the package
# ------------------------------------------------------------------------------------------------
def shipped_checkpoint_path(network: str) -> Optional[Path]:
    """``napari_covidseg/weights/<network>.pt`` if it exists, else ``None``."""
    path = WEIGHTS_DIR / f"{network}.pt"
    return path if path.is_file() else None


def available_shipped() -> List[str]:
    """Registered networks that have shipped weights, in registry order."""
    return [name for name in network_names() if shipped_checkpoint_path(name) is not None]


def load_shipped(network: str, map_location="cpu") -> LoadedModel:
    """Load the weights shipped with the package for ``network``."""
    path = shipped_checkpoint_path(network)
    if path is None:
        if network not in network_names():
            raise CheckpointError(f"unknown network {network!r}; known networks: {', '.join(network_names())}")
        have = available_shipped()
        raise CheckpointError(
            f"no shipped weights for `{network}` (expected {WEIGHTS_DIR / (network + '.pt')}); "
            f"networks with shipped weights: {', '.join(have) or 'none'}; "
            "train one with `python -m training train` and pass its checkpoint"
        )
    return load_checkpoint(path, expected_network=network, map_location=map_location)
