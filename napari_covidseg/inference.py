"""Whole-volume prediction: any registered network applied to a CT in its display grid.

Readings chosen
---------------
* Normalisation is computed **once per volume** (the clip window and, for ``"zscore"``, the mean
  and standard deviation of the whole clipped CT), never per slice or per patch: a patch that
  holds only air or only mediastinum would otherwise be stretched to unit variance and look like
  lung.  Training on patches sees slightly different statistics; that is the usual MIScnn reading.
* 2D networks run slice by slice in batches of ``batch_size`` slices; only one batch is on the
  device at a time.  If ``preprocessing.inplane_size`` is set each slice is resized (bilinear) to
  it and the probabilities are resized back (bilinear) to the slice size; slices are padded
  (reflect) to a multiple of the network's ``stride`` and the output is cropped back.
* 3D networks: the volume is resampled (trilinear, ``torch.nn.functional.interpolate``) to
  ``preprocessing.target_spacing`` when it is set, cut into overlapping patches of ``patch_size``
  (default: the recipe's ``input_size`` clipped to the volume; a volume smaller than the patch is
  padded to the network's stride), with step ``patch * (1 - overlap)`` (half-patch overlap by
  default, as in the QC-HC paper) and the last patch of each axis flush with the far border.
  Sigmoid probabilities of overlapping patches are averaged, with ``weighting="uniform"`` (plain
  mean, the paper's reading, default) or ``"gaussian"`` (centre-weighted, sigma = patch / 8, as in
  nnU-Net; weights never reach zero so every voxel is covered).  The probabilities are then
  resampled back (trilinear) to the original grid.  Patches run one at a time (``batch_size``
  applies to 2D slices only): a 160x160x80 patch of a full-width 3D U-Net already needs a few GB.
* On CUDA the forward passes run under ``torch.autocast`` (bfloat16 where the GPU supports it,
  else float16); on CPU in float32.  Everything runs under ``torch.inference_mode()``.
* ``progress(done, total)`` is called after each batch (2D) or patch (3D); ``should_cancel()`` is
  checked before each one and a ``True`` raises :class:`CancelledError`.
* The infection channel is returned as the network predicts it, **not** masked by the lung
  channel: networks that restrict infection to the lungs (CHS-Net's cascade) do so in their own
  forward, and keeping the raw map lets the user see infection predicted outside the lungs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CancelledError, InputError
from .intensity import HU, check_domain
from .models.registry import NetworkSpec
from .preprocessing import Preprocessing, preprocess

DeviceLike = Union[str, torch.device, None]
ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]

DEFAULT_3D_PATCH = (80, 160, 160)


# ------------------------------------------------------------------------------------------------
# device
# ------------------------------------------------------------------------------------------------
def resolve_device(choice: DeviceLike = "auto") -> torch.device:
    """``"auto"`` -> first CUDA GPU if there is one, else CPU; ``"cpu"``; ``"cuda"`` / ``"cuda:N"``.

    Asking for CUDA on a machine without a usable GPU (or for a GPU index that does not exist)
    raises :class:`InputError` with what to choose instead.
    """
    if isinstance(choice, torch.device):
        choice = str(choice)
    text = (choice or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise InputError(f"unknown device {choice!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise InputError(
            f"device {choice!r} was asked for but CUDA is not available here "
            f"(PyTorch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); use 'cpu' or 'auto'"
        )
    index = int(match.group(1)) if match.group(1) is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(f"device {choice!r} does not exist: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device(f"cuda:{index}")


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """Pad the spatial dims of (B, C, ...) ``x`` (reflect where possible, else replicate)."""
    spatial = list(x.shape[2:])
    extras = [(-s) % multiple for s in spatial]
    crop = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extras, spatial))
    if not any(extras):
        return x, crop
    pads = []
    for e in reversed(extras):
        pads += [e // 2, e - e // 2]
    mode = "reflect" if all(e - e // 2 < s for e, s in zip(extras, spatial)) else "replicate"
    return F.pad(x, pads, mode=mode), crop


def _forward_logits(model: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    x, crop = _pad_to_multiple(x, stride)
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    if logits.shape[1] != 2:
        raise InputError(f"the network returned {logits.shape[1]} channels, expected 2 (lung, infection)")
    return logits[(slice(None), slice(None)) + crop]


def _check_input(ct_hu, spacing) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    ct = np.asarray(ct_hu)
    if ct.ndim != 3:
        raise InputError(f"a CT volume must have 3 dimensions (z, y, x), this one has shape {ct.shape}")
    if min(ct.shape) < 1:
        raise InputError(f"the CT volume is empty (shape {ct.shape})")
    if not np.issubdtype(ct.dtype, np.number) or np.issubdtype(ct.dtype, np.complexfloating):
        raise InputError(f"the CT must hold real numbers (HU), not {ct.dtype}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be three positive numbers (z, y, x) in mm, not {spacing}")
    return ct, spacing


def _spec_parts(spec_or_dims) -> Tuple[int, int, Optional[Tuple[int, ...]]]:
    """(dims, stride, default 3D patch) from a NetworkSpec or a plain 2 / 3."""
    if isinstance(spec_or_dims, NetworkSpec):
        patch = tuple(int(v) for v in spec_or_dims.recipe.input_size) if spec_or_dims.dims == 3 else None
        return spec_or_dims.dims, int(spec_or_dims.stride), patch
    dims = int(spec_or_dims)
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, not {dims}")
    return dims, 16, DEFAULT_3D_PATCH if dims == 3 else None


def _starts(size: int, patch: int, step: int) -> list:
    """Window starts along one axis: every ``step``, with the last window flush with the border."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _gaussian_weights(patch: Sequence[int]) -> torch.Tensor:
    axes = []
    for p in patch:
        c = (p - 1) / 2.0
        sigma = max(p / 8.0, 1e-3)
        axes.append(torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float32) - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return w.clamp_min(1e-3)  # the border of a patch still counts, so every voxel has weight > 0


def _call(fn: ProgressFn, done: int, total: int) -> None:
    if fn is not None:
        fn(done, total)


def _check_cancel(should_cancel: CancelFn) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("segmentation cancelled")


# ------------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------------
def predict_volume(
    model: nn.Module,
    spec_or_dims: Union[NetworkSpec, int],
    ct_hu: np.ndarray,
    spacing: Sequence[float],
    preprocessing: Preprocessing,
    device: DeviceLike = "auto",
    batch_size: int = 4,
    progress: ProgressFn = None,
    should_cancel: CancelFn = None,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    weighting: str = "uniform",
    amp: bool = True,
    domain: str = HU,
) -> np.ndarray:
    """Sigmoid probabilities ``(2, z, y, x)`` float32 (lung, infection) for a CT.

    ``ct_hu`` is display-ordered (z, y, x) with ``spacing`` (z, y, x) mm, in intensity ``domain``
    (``"hu"`` or ``"display8"``; brought into the network's own by the checkpoint's preprocessing).
    The model is moved to ``device`` and put in eval mode.  See the module docstring for how 2D
    and 3D networks run.
    """
    ct, spacing = _check_input(ct_hu, spacing)
    check_domain(domain)
    dims, stride, default_patch = _spec_parts(spec_or_dims)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), not {overlap}")
    if weighting not in ("uniform", "gaussian"):
        raise InputError(f"unknown weighting {weighting!r}; use 'uniform' or 'gaussian'")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    _check_cancel(should_cancel)
    # normalisation statistics of the whole volume (see module docstring); an 8-bit network's
    # HU mapping may change the in-plane size: spacing follows, predictions go back to ct's grid
    volume = preprocess(ct, preprocessing, domain)
    spacing = (spacing[0],) + tuple(s * n / m for s, n, m in zip(spacing[1:], ct.shape[1:], volume.shape[1:]))
    if dims == 2:
        return _predict_2d(model, volume, stride, preprocessing, dev, batch_size, progress, should_cancel, amp,
                           out_hw=ct.shape[1:])
    return _predict_3d(model, volume, spacing, stride, preprocessing, dev, patch_size or default_patch, overlap,
                       weighting, progress, should_cancel, amp, out_shape=ct.shape)


def _predict_2d(model, volume, stride, preprocessing, dev, batch_size, progress, should_cancel, amp,
                out_hw=None) -> np.ndarray:
    z, h, w = volume.shape
    out_h, out_w = (int(v) for v in (out_hw or (h, w)))
    probabilities = np.empty((2, z, out_h, out_w), dtype=np.float32)
    total = math.ceil(z / batch_size)
    resize = tuple(int(v) for v in preprocessing.inplane_size) if preprocessing.inplane_size else None
    if resize == (h, w):
        resize = None
    back = None if (resize or (h, w)) == (out_h, out_w) else (out_h, out_w)
    with torch.inference_mode():
        for k, start in enumerate(range(0, z, batch_size)):
            _check_cancel(should_cancel)
            stop = min(start + batch_size, z)
            x = torch.from_numpy(np.ascontiguousarray(volume[start:stop]))[:, None].to(dev)
            if resize is not None:
                x = F.interpolate(x, size=resize, mode="bilinear", align_corners=False)
            with _autocast(dev, amp):
                logits = _forward_logits(model, x, stride)
            prob = torch.sigmoid(logits.float())
            if back is not None:
                prob = F.interpolate(prob, size=back, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
            probabilities[:, start:stop] = prob.permute(1, 0, 2, 3).cpu().numpy()
            _call(progress, k + 1, total)
    return probabilities


def _resample(x: np.ndarray, size: Tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling of a (C, z, y, x) or (z, y, x) float array to ``size``."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    squeeze = t.ndim == 3
    t = t[None, None] if squeeze else t[None]
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0]
    return (out[0] if squeeze else out).numpy()


def _predict_3d(model, volume, spacing, stride, preprocessing, dev, patch_size, overlap, weighting,
                progress, should_cancel, amp, out_shape=None) -> np.ndarray:
    original_shape = tuple(out_shape or volume.shape)
    if preprocessing.inplane_size is not None:  # 8-bit networks: slices resized, z kept (spacing unknown)
        size = (volume.shape[0],) + tuple(int(v) for v in preprocessing.inplane_size)
        if size != volume.shape:
            volume = _resample(volume, size)
    elif preprocessing.target_spacing is not None:
        target = tuple(float(s) for s in preprocessing.target_spacing)
        new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, spacing, target))
        if new_shape != volume.shape:
            volume = _resample(volume, new_shape)
    shape = volume.shape
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise InputError(f"a 3D patch size must be three positive integers (D, H, W), not {patch_size}")
    patch = tuple(min(p, n) for p, n in zip(patch_size, shape))
    steps = tuple(max(1, int(p * (1.0 - overlap))) for p in patch)
    starts = [_starts(n, p, s) for n, p, s in zip(shape, patch, steps)]
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    weight = _gaussian_weights(patch) if weighting == "gaussian" else torch.ones(patch)
    accumulated = torch.zeros((2,) + tuple(shape), dtype=torch.float32)
    weight_sum = torch.zeros(tuple(shape), dtype=torch.float32)
    source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    with torch.inference_mode():
        for k, (a, b, c) in enumerate(windows):
            _check_cancel(should_cancel)
            region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            x = source[region][None, None].to(dev)
            with _autocast(dev, amp):
                logits = _forward_logits(model, x, stride)
            prob = torch.sigmoid(logits.float())[0].cpu()
            accumulated[(slice(None),) + region] += prob * weight
            weight_sum[region] += weight
            _call(progress, k + 1, len(windows))
    probabilities = (accumulated / weight_sum).numpy()
    if probabilities.shape[1:] != tuple(original_shape):
        probabilities = np.clip(_resample(probabilities, original_shape), 0.0, 1.0)
    return probabilities.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------
@dataclass
class SegmentationResult:
    """Binary masks (uint8, 0/1) and the probabilities they were thresholded from."""

    lung: np.ndarray
    infection: np.ndarray
    probabilities: np.ndarray  # (2, z, y, x) float32: lung, infection
    network: str = ""
    threshold: float = 0.5


def segment_volume(loaded, ct_hu: np.ndarray, spacing: Sequence[float], threshold: float = 0.5,
                   device: DeviceLike = "auto", **kwargs) -> SegmentationResult:
    """Segment a CT with a :class:`~napari_covidseg.checkpoint.LoadedModel`.

    A voxel belongs to a mask when its probability is above ``threshold``.  The infection mask is
    not restricted to the lung mask (see the module docstring).  ``kwargs`` go to
    :func:`predict_volume` (``batch_size``, ``progress``, ``should_cancel``, ``patch_size``,
    ``overlap``, ``weighting``, ``amp``).
    """
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold must be between 0 and 1 (exclusive), not {threshold}")
    probabilities = predict_volume(loaded.model, loaded.spec, ct_hu, spacing, loaded.preprocessing, device=device, **kwargs)
    masks = (probabilities > float(threshold)).astype(np.uint8)
    return SegmentationResult(lung=masks[0], infection=masks[1], probabilities=probabilities,
                              network=loaded.network, threshold=float(threshold))
