"""The one registry of segmentation networks, read by the GUI, the CLI and ``training``.

Each network lives in its own module under ``napari_covidseg.models`` and registers itself with
:func:`register`.  Adding a network means adding one file and one line in
``napari_covidseg/models/__init__.py``.

Contract every registered network follows
-----------------------------------------
* input: float tensor ``(B, 1, H, W)`` (2D) or ``(B, 1, D, H, W)`` (3D), already passed through
  :func:`napari_covidseg.preprocessing.preprocess` with the spec's ``preprocessing``;
* ``forward`` returns a ``dict`` with at least ``"logits"``: ``(B, 2, ...)`` same spatial size as the
  input, channel 0 = lung, channel 1 = infection, to be read through a sigmoid (multi-label);
  networks may add other entries (auxiliary heads, intermediate maps) used by their loss;
* the loss built by ``spec.loss(**loss_kwargs)`` is called as
  ``loss(outputs, target, progress)`` with ``target`` a float ``(B, 2, ...)`` tensor in {0, 1} and
  ``progress`` in [0, 1] (fraction of training done, for scheduled terms) and returns
  ``(total_loss_tensor, {"term": float, ...})``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch.nn as nn

from ..preprocessing import Preprocessing

CLASS_NAMES = ("lung", "infection")


@dataclass(frozen=True)
class Recipe:
    """A paper's training recipe; every field can be overridden by ``training``."""

    optimizer: str = "adam"  # adam | rmsprop | sgd | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "poly"  # poly | plateau | cosine | constant
    epochs: int = 100
    batch_size: int = 8
    input_size: tuple = (256, 256)  # (H, W) for 2D, (D, H, W) patch for 3D
    augmentation: tuple = ("flip", "rotate")
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    title: str
    build: Callable[..., nn.Module]
    dims: int  # 2 or 3
    loss: Callable[..., nn.Module]
    preprocessing: Preprocessing
    recipe: Recipe
    default_kwargs: dict = field(default_factory=dict)
    # constructor arguments of the small variant whose weights ship with the package
    shipped_kwargs: dict = field(default_factory=dict)
    paper: str = ""
    # the network's downsampling factor: spatial input sizes are padded to a multiple of it
    stride: int = 16

    def create(self, **overrides) -> nn.Module:
        kwargs = {**self.default_kwargs, **overrides}
        return self.build(**kwargs)


_REGISTRY: Dict[str, NetworkSpec] = {}


def register(spec: NetworkSpec) -> NetworkSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"network {spec.name!r} is registered twice")
    if spec.dims not in (2, 3):
        raise ValueError(f"network {spec.name!r}: dims must be 2 or 3, not {spec.dims}")
    _REGISTRY[spec.name] = spec
    return spec


def get_network(name: str) -> NetworkSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown network {name!r}; known networks: {known}") from None


def network_names() -> List[str]:
    _ensure_loaded()
    return list(_REGISTRY)


def _ensure_loaded() -> None:
    # importing the package imports every network module, each of which calls register()
    import napari_covidseg.models  # noqa: F401
