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
* ``extra``: optimizer / scheduler / RNG states used by ``training`` to resume;
* ``digest``: ``{"algorithm": "sha256", "value": hex}`` of everything above (:func:`payload_digest`);
  written since this key exists, checked when present (older checkpoints have none and still load).

Files are written atomically (temporary file in the same folder, then ``os.replace``), so a crash
or a full disk never leaves a half-written checkpoint under the final name.

Reading trusts nothing in the file: only regular files are opened; the zip archive ``torch.save``
writes is verified member by member (CRC-32) before ``torch.load`` sees it, then the digest; a
pickle that would build Python objects is refused without running anything; the network is first
built on PyTorch's ``meta`` device (no memory) from bounded constructor arguments and compared with
the stored tensors' shapes, so a crafted ``network_kwargs`` cannot make it allocate gigabytes; the
preprocessing sizes are bounded too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import __version__
from .atomic_file import atomic_path
from .errors import CheckpointError
from .io.volume import available_memory, is_regular_file
from .models.registry import NetworkSpec, get_network, network_names
from .preprocessing import Preprocessing

FORMAT_NAME = "napari-covidseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

PathLike = Union[str, os.PathLike]

_DAMAGED = "the file is damaged or not a napari-covidseg checkpoint"
DIGEST_KEY = "digest"
#: bounds on what a checkpoint may ask for (constructor integers, in-plane size, spacing in mm)
MAX_KWARG_INT = 4096
INPLANE_RANGE = (8, 2048)
SPACING_RANGE_MM = (0.05, 50.0)


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


def _hash_into(h, value: Any) -> None:
    """Feed ``value`` (what ``weights_only`` loads: tensors, numbers, strings, lists, dicts) to ``h`` in a
    canonical order, each item tagged with its type and length so that no two contents collide."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _hash_into(h, key)
            _hash_into(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _hash_into(h, item)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(value, float):
        h.update(f"F{value.hex() if math.isfinite(value) else repr(value)}".encode())
    else:  # None, bool, int (and anything else weights_only lets through, by its repr)
        h.update(f"{type(value).__name__}:{value!r};".encode())


def payload_digest(payload: dict) -> str:
    """SHA-256 of a checkpoint's content (every key but the digest itself), as hex."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


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
    payload[DIGEST_KEY] = {"algorithm": "sha256", "value": payload_digest(payload)}
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
def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pick a .pt file")
    if not is_regular_file(path):
        raise CheckpointError(f"{path} is not a regular file (a pipe, device or socket); pick a .pt file")
    memory = available_memory()
    if memory is not None and 2 * path.stat().st_size > memory:
        raise CheckpointError(f"{path} is {path.stat().st_size / 2**30:.1f} GiB, more than this machine's memory "
                              f"({memory / 2**30:.1f} GiB available) can load; it is no napari-covidseg checkpoint or "
                              "needs a larger machine")


def _verify_archive(path: Path) -> None:
    """Check every member of the zip ``torch.save`` wrote against its CRC-32 (torch itself does not)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} (it is not the zip archive torch.save writes; "
                              "it may be truncated, another format, or saved by a very old PyTorch)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} ({' '.join(str(exc).split())[:200]})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the CRC check of its part '{bad}' failed, so some of its bytes "
                              "changed after it was written; copy it again or use another checkpoint")


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    """The user's message for what ``torch.load(weights_only=True)`` raised (a refused pickle says so)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)|(Unsupported operand \d+)", text)
        what = next((g for g in (found.groups() if found else ()) if g), "objects of other types")
        return CheckpointError(
            f"{path} was refused: it holds Python objects ({what}) that no napari-covidseg checkpoint "
            "contains, and unpickling them could run code from the file. Nothing from it was run. Do not open it "
            "with torch.load(weights_only=False); use a checkpoint saved by napari-covidseg or `python -m training`."
        )
    return CheckpointError(f"cannot read {path}: {_DAMAGED} ({text[:200] or type(exc).__name__})")


def _check_digest(raw: dict, path: Path) -> None:
    digest = raw.get(DIGEST_KEY)
    if digest is None:
        return  # written before checkpoints had one: the zip CRCs were the check
    if not isinstance(digest, dict) or digest.get("algorithm") != "sha256" or not isinstance(digest.get("value"), str):
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} (its digest entry is malformed)")
    if payload_digest(raw) != digest["value"]:
        raise CheckpointError(f"{path} is corrupt: its content does not match the digest written with it, so it was "
                              "changed after it was written; copy it again or use another checkpoint")


def _read_raw(path: PathLike, map_location="cpu") -> dict:
    """The checkpoint's dict, verified (regular file, zip CRCs, no pickled objects, digest, format)."""
    path = Path(path)
    _check_file(path)
    _verify_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for the user
            raw = torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError,
            AttributeError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise _load_error(path, exc) from None
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
    _check_digest(raw, path)
    for key in ("network", "state_dict"):
        if key not in raw:
            raise CheckpointError(f"cannot read {path}: {_DAMAGED} (no {key!r} entry)")
    if not isinstance(raw["state_dict"], dict) or not all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values()):
        raise CheckpointError(f"cannot read {path}: {_DAMAGED} (its state_dict is not a dict of tensors)")
    return raw


#: the verified raw dict of a checkpoint, optimizer state included (``training`` resumes from it)
read_raw = _read_raw


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


def _check_kwarg(key: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and not -MAX_KWARG_INT <= value <= MAX_KWARG_INT:
        raise CheckpointError(f"{where}: the network argument {key}={value} is out of range (at most {MAX_KWARG_INT})")
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_KWARG_INT):
        raise CheckpointError(f"{where}: the network argument {key}={value} is not a finite number up to {MAX_KWARG_INT}")
    if isinstance(value, str) and len(value) > 100:
        raise CheckpointError(f"{where}: the network argument {key} is a {len(value)}-character string")
    if isinstance(value, (list, tuple)):
        if len(value) > 16:
            raise CheckpointError(f"{where}: the network argument {key} is a list of {len(value)} items")
        for item in value:
            _check_kwarg(key, item, where)
    elif not isinstance(value, (int, float, str)):
        raise CheckpointError(f"{where}: the network argument {key} is a {type(value).__name__}, not a number, string or list")


def build_network_skeleton(spec: NetworkSpec, kwargs: dict, where: str, state: Optional[dict] = None,
                           hint: str = "the checkpoint was probably made by another version of napari-covidseg") -> nn.Module:
    """``spec``'s network with ``kwargs`` on the ``meta`` device (shapes only, no memory), checked.

    The arguments must be bounded plain values; with ``state`` the network's weights must have the
    stored tensors' shapes, without it its parameters must fit (for training) in the memory
    available now.  Raises :class:`CheckpointError` with the reason.
    """
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"{where}: the network arguments are not a dict of names: {kwargs!r}"[:300])
    for key, value in kwargs.items():
        _check_kwarg(key, value, where)
    try:
        with torch.device("meta"):
            skeleton = spec.create(**kwargs)
    except Exception as exc:  # any constructor error: the arguments do not describe this network
        raise CheckpointError(
            f"{where}: the `{spec.name}` network cannot be built with the arguments {kwargs} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); {hint}"
        ) from None
    if state is not None:
        mismatch = _summarise_mismatch(skeleton, state)
        if mismatch:
            raise CheckpointError(f"the weights in {where} do not fit the `{spec.name}` network built with {kwargs}: "
                                  f"{mismatch}; the checkpoint was made for another architecture or version")
        return skeleton
    need = 4 * sum(t.numel() for t in skeleton.state_dict().values())
    memory = available_memory()
    if memory is not None and 4 * need > memory:  # weights, gradients and two optimizer moments
        raise CheckpointError(f"{where}: the `{spec.name}` network with {kwargs} has {need / 4 / 1e6:,.0f} M "
                              f"parameters and would need about {4 * need / 2**30:.1f} GiB to train, more than the "
                              f"{memory / 2**30:.1f} GiB available; choose smaller network arguments")
    return skeleton


def build_network(spec: NetworkSpec, kwargs: dict, where: str, state: Optional[dict] = None,
                  hint: str = "the checkpoint was probably made by another version of napari-covidseg") -> nn.Module:
    """``spec``'s network with ``kwargs``, allocated only after :func:`build_network_skeleton` passed: a
    crafted ``{"base": 1024}`` is refused instead of allocating gigabytes."""
    build_network_skeleton(spec, kwargs, where, state=state, hint=hint)
    return spec.create(**kwargs)


def _checked_preprocessing(raw: dict, spec: NetworkSpec, path) -> Preprocessing:
    """The stored preprocessing, with sizes a volume can be resized to without exhausting memory."""
    try:
        prep = Preprocessing.from_dict(raw["preprocessing"]) if raw.get("preprocessing") else spec.preprocessing
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its preprocessing settings are invalid ({exc})") from None
    if not (math.isfinite(float(prep.hu_min)) and math.isfinite(float(prep.hu_max))):
        raise CheckpointError(f"{path}: its preprocessing window {prep.hu_min}..{prep.hu_max} HU is not finite")
    low, high = INPLANE_RANGE
    if prep.inplane_size is not None and (len(prep.inplane_size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in prep.inplane_size)):
        raise CheckpointError(f"{path}: its preprocessing in-plane size {prep.inplane_size} is not two integers "
                              f"between {low} and {high}; the checkpoint is damaged or was not made by napari-covidseg")
    low, high = SPACING_RANGE_MM
    if prep.target_spacing is not None and (len(prep.target_spacing) != 3 or not all(
            isinstance(v, (int, float)) and low <= float(v) <= high for v in prep.target_spacing)):
        raise CheckpointError(f"{path}: its preprocessing spacing {prep.target_spacing} is not three sizes between "
                              f"{low} and {high} mm; the checkpoint is damaged or was not made by napari-covidseg")
    return prep


def load_checkpoint(path: PathLike, expected_network: Optional[str] = None, map_location="cpu") -> LoadedModel:
    """Rebuild the network stored in ``path`` (eval mode, float32, on ``map_location``).

    Raises :class:`CheckpointError` with a message for the user when the file is missing,
    damaged (CRC or digest), holds pickled objects, is of another format, for an unknown or
    unexpected network, when its network arguments or preprocessing sizes are out of bounds, or
    when its weights do not fit the architecture its ``network_kwargs`` describe (checked on the
    ``meta`` device, before the real network is allocated).
    """
    raw = _read_raw(path, map_location=map_location)
    spec = _spec_for(raw, path, expected_network)
    kwargs = raw.get("network_kwargs") or {}
    state = raw["state_dict"]
    model = build_network(spec, kwargs, str(path), state=state)
    kwargs = dict(kwargs)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{path} holds weights that are NaN or infinite ({', '.join(broken[:3])}"
                              f"{' ...' if len(broken) > 3 else ''}): the training that wrote it diverged or the file "
                              "was damaged; use another checkpoint (e.g. best.pt, or an earlier one)")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(map_location if map_location is not None else "cpu")
    model.float().eval()
    preprocessing = _checked_preprocessing(raw, spec, path)
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
