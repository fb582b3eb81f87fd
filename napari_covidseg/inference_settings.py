"""How each network runs at inference on the CPU: memory format, an opt-in compiled path, threads.

Chosen by measurement (``python -m benchmarks.speed``, ``benchmarks/results/speed.md``), not by
rule: channels-last helps a network whose time goes to large convolutions that oneDNN runs faster
in NHWC and costs one whose time goes to ops that are slower there, so it is a per-network
setting.  Every setting gives the same masks (the outputs agree to float rounding).

* ``channels_last``: the network's weights in ``torch.channels_last`` (``channels_last_3d`` for
  3D networks) while it predicts, so its convolutions run, and hand on their output, channels-last
  (a one-channel input is the same in both layouts, so converting the input alone does nothing).
  The parameters are put back as they were afterwards (:func:`weights_layout`): the trainer
  validates with this code, and a training model's weights keep their layout for resumed runs to
  stay bit-exact.
* ``onnx``: run the network in ONNX Runtime (:mod:`napari_covidseg.onnx_backend`) where it is
  installed (``pip install napari-covidseg[onnx]``; not a dependency), on the CPU only; an export
  that fails or disagrees with PyTorch falls back to PyTorch with one warning.
* ``fold_batch_norm``: run a copy of the network with each BatchNorm folded into the convolution
  before it (:mod:`napari_covidseg.bn_folding`), in the chosen memory format; on the CPU, in
  PyTorch (ONNX Runtime and ``torch.compile`` fold on their own).
* ``compile`` (opt-in, off by default; ``COVIDSEG_COMPILE=1`` turns it on): ``torch.compile`` of
  the model, compiled once per model object and process and reused for every volume (the compile
  takes tens of seconds on a CPU); 2D batches are padded to the full batch size so one compiled
  graph serves every batch.  Where compiling is not possible (no C++ compiler, an op the compiler
  does not support) the model runs uncompiled and one warning says why.
* ``batch_size``: slices per forward pass of a 2D network on the CPU when the caller does not
  choose one.  One slice at a time on the CPU: the forward's working memory (the largest part of
  the memory a run adds) grows with the batch, and larger batches are no faster there (measured,
  512 x 512 slices read at 256 x 256, 2 threads: ms_unet 0.14 s/slice at 1, 0.16 at 4; chs_net
  0.29 / 0.36; msa_cpp_unet 0.15 / 0.22; unet 0.09 / 0.12), with the same masks (a slice's output
  does not depend on its batch).  On a GPU :data:`GPU_BATCH_SIZE` slices, where batches pay off.
* threads: ``napari_covidseg`` sets ``OMP_WAIT_POLICY=PASSIVE`` when it is imported before
  PyTorch and the variable is not set (see ``napari_covidseg/__init__.py``): OpenMP's default
  spinning waits make a 2-thread forward several times slower when other processes share the
  cores, passive waits do not (measured in the benchmark).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import onnx_backend
from .bn_folding import FoldedRunner


@dataclass(frozen=True)
class InferenceSettings:
    channels_last: bool = False
    compile: bool = False
    onnx: bool = False
    batch_size: int = 1
    fold_batch_norm: bool = False


#: slices per forward pass of a 2D network on a GPU when the caller does not choose
GPU_BATCH_SIZE = 4


#: per-network choices, measured on a shared 2-core CPU (benchmarks/results/speed.md); ONNX for
#: the networks it exports correctly and speeds up (chs_net's FFTs are exported as matrix products,
#: ``models/spectral_matrices.py``: forward 0.145 s a slice in ONNX Runtime against 0.259 in
#: PyTorch, speed.md of 2026-12-01 14:53 UTC; channels-last stays its setting where ONNX Runtime is
#: not installed).  ms_unet's 1.5x -> 1x pooling was exported as gathers (a quarter of its ONNX
#: Runtime time, slower than PyTorch with folded BatchNorms); written as pooling of pairs of slices
#: (``ms_unet.pool_three_to_two``) its forward takes 0.097 s a slice in ONNX Runtime against 0.124
#: folded (same run).  The folded PyTorch path stays its setting where ONNX Runtime is not installed.
NETWORK_SETTINGS = {
    "unet": InferenceSettings(channels_last=False, onnx=True),
    "ms_unet": InferenceSettings(channels_last=True, fold_batch_norm=True, onnx=True),
    "msa_cpp_unet": InferenceSettings(channels_last=True, onnx=True),
    "chs_net": InferenceSettings(channels_last=True, onnx=True),
    "qchc_unet3d": InferenceSettings(channels_last=False, onnx=True),
}


def compile_requested() -> bool:
    return os.environ.get("COVIDSEG_COMPILE", "").strip().lower() in ("1", "true", "yes", "on")


def settings_for(network: Optional[str], device: torch.device, compile: Optional[bool] = None) -> InferenceSettings:
    """The settings of ``network`` (defaults for an unknown one) on ``device``; ``compile``
    overrides the ``COVIDSEG_COMPILE`` environment variable.  ONNX Runtime is used on the CPU only,
    where it is installed, and not together with ``torch.compile``; ``batch_size`` is the CPU's
    on the CPU and :data:`GPU_BATCH_SIZE` elsewhere."""
    chosen = NETWORK_SETTINGS.get(network or "", InferenceSettings())
    want_compile = compile_requested() if compile is None else bool(compile)
    onnx = chosen.onnx and not want_compile and device.type == "cpu" and onnx_backend.available()
    batch_size = chosen.batch_size if device.type == "cpu" else GPU_BATCH_SIZE
    fold = chosen.fold_batch_norm and not want_compile and not onnx and device.type == "cpu"
    return replace(chosen, compile=want_compile, onnx=onnx, batch_size=batch_size, fold_batch_norm=fold)


def memory_format(dims: int) -> torch.memory_format:
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def prepare_model(model: nn.Module, device: torch.device, settings: InferenceSettings, dims: int,
                  stride: int = 16) -> Callable:
    """The model on ``device`` in eval mode; returns the callable to run it with (the compiled model where asked for and possible, else the model).

    The compiled callable is kept on the model object itself, so it lives as long as the model
    and every volume segmented with that model reuses it.  ``stride``: the network's (sizes keep
    their remainder modulo it when ONNX Runtime's graph is traced on a small crop).
    """
    model = model.to(device).eval()
    if settings.onnx:
        if _ONNX not in model.__dict__:
            object.__setattr__(model, _ONNX, onnx_backend.OnnxRunner(model, stride))
        model.__dict__[_ONNX].weights.relist()  # once per volume: a replaced parameter is seen too
        return model.__dict__[_ONNX]
    if settings.fold_batch_norm:
        if _FOLDED not in model.__dict__:
            layout = memory_format(dims) if settings.channels_last else torch.contiguous_format
            object.__setattr__(model, _FOLDED, FoldedRunner(model, layout))
        model.__dict__[_FOLDED].weights.relist()
        return model.__dict__[_FOLDED]
    if not settings.compile or model.__dict__.get(_FAILED):
        return model
    if _COMPILED not in model.__dict__:
        object.__setattr__(model, _COMPILED, _with_fallback(model))  # not a submodule: no state_dict entry
    return model.__dict__[_COMPILED]


_COMPILED, _FAILED, _ONNX = "_covidseg_compiled", "_covidseg_compile_failed", "_covidseg_onnx"
_FOLDED = "_covidseg_folded"


@contextmanager
def weights_layout(model: nn.Module, settings: InferenceSettings, dims: int):
    """Within the block, ``model``'s convolution weights are channels-last when ``settings`` ask
    for it (and PyTorch runs the model); afterwards every parameter is its original tensor again."""
    if not settings.channels_last or settings.onnx or settings.fold_batch_norm:  # those run their own copy
        yield
        return
    layout, originals = memory_format(dims), []
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.dim() == dims + 2:
                originals.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=layout)
    try:
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data


def _with_fallback(model: nn.Module) -> Callable:
    """``torch.compile(model)``, falling back to ``model`` for good at its first failure."""
    try:
        compiled = torch.compile(model, dynamic=False)
    except Exception as exc:  # torch.compile itself refuses (e.g. an unsupported Python)
        return _give_up(model, exc)

    def run(x):
        if model.__dict__.get(_FAILED):
            return model(x)
        try:
            return compiled(x)
        except Exception as exc:  # compilation happens at the first call: a missing compiler, an unsupported op
            return _give_up(model, exc)(x)

    return run


def _give_up(model: nn.Module, exc: BaseException) -> nn.Module:
    object.__setattr__(model, _FAILED, True)
    model.__dict__.pop(_COMPILED, None)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    warnings.warn(f"torch.compile is not possible here ({type(exc).__name__}: {first_line[:200]}); "
                  "running the network uncompiled", RuntimeWarning, stacklevel=3)
    return model
