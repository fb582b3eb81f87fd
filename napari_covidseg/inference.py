"""Whole-volume prediction: any registered network applied to a CT in its display grid.

Readings chosen
---------------
* Normalisation uses statistics of the **whole volume** (the clip window and, for ``"zscore"``,
  the mean and standard deviation of the whole clipped image in the network's domain), never of a
  slice or a patch: a patch that holds only air or only mediastinum would otherwise be stretched
  to unit variance and look like lung.  For 3D networks the statistics are those of the volume
  resampled to the network's grid (what the network sees), for 2D networks those of the image in
  the network's domain.  Training on patches sees slightly different statistics; that is the
  usual MIScnn reading.
* Memory stays bounded: the CT is never copied whole as float.  2D networks read, map into their
  domain, normalise, predict and threshold a batch of ``batch_size`` slices at a time; 3D networks
  build the network-grid volume a few slices at a time (:mod:`napari_covidseg.streaming`), keep
  the overlap-averaging sums only for the band of slices the current row of patches covers, and
  resample each finished band back to the CT's grid and threshold it at once.  Probabilities are
  kept only when asked for (``float16`` unless ``float32`` is asked for; the masks are always
  thresholded from the float32 values, so they do not depend on it).  A caller that has no more
  use for the CT (the CLI) hands it over (:class:`HandedOverCT`): a 3D network then lets it go as
  soon as the network-grid volume is built, so the CT and the network's working memory are never
  held at once.
* 2D networks run slice by slice in batches; only one batch is on the device at a time.  The
  batch size, unless given, is the network's setting (one slice on the CPU, where the forward's
  working memory is most of what a run adds and larger batches are no faster; four on a GPU;
  :mod:`napari_covidseg.inference_settings`); a slice's output does not depend on it.  If
  ``preprocessing.inplane_size`` is set each slice is resized (bilinear) to it and the
  probabilities are resized back (bilinear) to the slice size; slices are padded (reflect) to a
  multiple of the network's ``stride`` and the output is cropped back.
* 3D networks: the volume is resampled (trilinear) to ``preprocessing.target_spacing`` when it is
  set (to ``inplane_size`` in-plane, z kept, for a network trained on 8-bit images), cut into
  overlapping patches of ``patch_size`` (default: the recipe's ``input_size`` clipped to the
  volume; a volume smaller than the patch is padded to the network's stride), with step
  ``patch * (1 - overlap)`` (half-patch overlap by default, as in the QC-HC paper) and the last
  patch of each axis flush with the far border.  Sigmoid probabilities of overlapping patches are
  averaged, with ``weighting="uniform"`` (plain mean, the paper's reading, default) or
  ``"gaussian"`` (centre-weighted, sigma = patch / 8, as in nnU-Net; weights never reach zero so
  every voxel is covered).  The probabilities are then resampled back (trilinear) to the original
  grid.  Patches run one at a time (``batch_size`` applies to 2D slices only).
* Per-network CPU settings (channels-last weights, ONNX Runtime where installed, an opt-in
  ``torch.compile``) come from :mod:`napari_covidseg.inference_settings`; they do not change the
  result beyond float rounding.
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
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CancelledError, InputError
from .intensity import HU, check_domain
from .inference_settings import InferenceSettings, prepare_model, settings_for, weights_layout
from .models.registry import NetworkSpec
from .preprocessing import Preprocessing, clip_to_domain, in_network_domain, normalise, zscore_stats
from .streaming import resample_slices, resize_inplane

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


def _forward_logits(model: Callable, x: torch.Tensor, stride: int) -> torch.Tensor:
    x, crop = _pad_to_multiple(x, stride)
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    if logits.shape[1] != 2:
        raise InputError(f"the network returned {logits.shape[1]} channels, expected 2 (lung, infection)")
    return logits[(slice(None), slice(None)) + crop]


class HandedOverCT:
    """A CT given to :func:`run_prediction` for good: the caller keeps no other reference, so the
    prediction may let it go once it has read what it needs (a 3D network: once its own volume is
    built; a 2D network reads it to the end)."""

    def __init__(self, ct: np.ndarray) -> None:
        self._ct = ct

    def take(self) -> np.ndarray:
        ct, self._ct = self._ct, None
        if ct is None:
            raise RuntimeError("this CT was handed over already")
        return ct


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


PROBABILITY_DTYPES = {"float16": np.float16, "float32": np.float32}


def _probability_dtype(dtype) -> np.dtype:
    dtype = np.dtype(PROBABILITY_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise InputError(f"probabilities are kept as float16 or float32, not {dtype}")
    return dtype


class _Output:
    """Where the probabilities go, a few slices at a time: masks thresholded at once (from the
    float32 values) and/or the probabilities kept in ``keep`` (float16 or float32).

    With ``packed`` the masks are held 8 voxels to a byte (``np.packbits`` along x, an eighth of
    the memory) and :meth:`mask` unpacks one channel when it is needed, so a caller that writes
    the masks one at a time after letting the CT go never holds the CT and two uint8 masks at once.
    """

    def __init__(self, shape: Tuple[int, ...], threshold: Optional[float], keep, packed: bool = False) -> None:
        self.shape, self.packed = tuple(int(n) for n in shape), bool(packed)
        self.threshold = None if threshold is None else float(threshold)
        held = self.shape[:-1] + ((self.shape[-1] + 7) // 8,) if self.packed else self.shape
        self.masks = np.zeros((2,) + held, np.uint8) if threshold is not None else None
        self.probabilities = None if keep is None else np.empty((2,) + self.shape, _probability_dtype(keep))

    def put(self, start: int, prob: torch.Tensor) -> None:
        """``prob``: (n, 2, y, x) float32 on the CPU for slices ``start .. start + n``."""
        channels_first = prob.transpose(0, 1)
        where = (slice(None), slice(start, start + prob.shape[0]))
        if self.masks is not None:
            above = (channels_first > self.threshold).numpy()
            self.masks[where] = np.packbits(above, axis=-1) if self.packed else above
        if self.probabilities is not None:
            self.probabilities[where] = channels_first.numpy()

    def mask(self, channel: int) -> np.ndarray:
        """The uint8 (0/1) mask of ``channel`` (0 lung, 1 infection), (z, y, x)."""
        if not self.packed:
            return self.masks[channel]
        return np.unpackbits(self.masks[channel], axis=-1, count=self.shape[-1])


@dataclass
class _Run:
    """One prediction's model, preprocessing and controls (what every step below needs)."""

    model: Callable
    dims: int
    stride: int
    preprocessing: Preprocessing
    domain: str
    device: torch.device
    settings: InferenceSettings
    batch_size: int
    amp: bool
    progress: ProgressFn
    should_cancel: CancelFn

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities (float32) of a (B, 1, ...) input batch."""
        n = x.shape[0]
        if self.settings.compile and self.dims == 2 and n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n,) + tuple(x.shape[1:]))])  # one compiled shape
        with _autocast(self.device, self.amp):
            logits = _forward_logits(self.model, x, self.stride)
        return torch.sigmoid(logits[:n].float())

    def in_domain(self, slices: np.ndarray) -> np.ndarray:
        """A few CT slices brought into the network's domain (mapped to 8-bit where needed)."""
        _check_cancel(self.should_cancel)
        return in_network_domain(slices, self.preprocessing, self.domain)

    def chunks(self, ct: np.ndarray, step: int) -> Iterator[np.ndarray]:
        """``ct`` in the network's domain, ``step`` slices at a time."""
        return (self.in_domain(ct[s:s + step]) for s in range(0, ct.shape[0], step))


# ------------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------------
def predict_volume(model: nn.Module, spec_or_dims: Union[NetworkSpec, int], ct_hu: np.ndarray,
                   spacing: Sequence[float], preprocessing: Preprocessing, dtype=np.float32, **kwargs) -> np.ndarray:
    """Sigmoid probabilities ``(2, z, y, x)`` of ``dtype`` (float32 by default) for a CT.

    ``ct_hu`` is display-ordered (z, y, x) with ``spacing`` (z, y, x) mm, in intensity ``domain``
    (``"hu"`` or ``"display8"``; brought into the network's own by the checkpoint's
    preprocessing).  ``kwargs`` are those of :func:`run_prediction`.
    """
    return run_prediction(model, spec_or_dims, ct_hu, spacing, preprocessing, keep=dtype, **kwargs).probabilities


def run_prediction(model: nn.Module, spec_or_dims: Union[NetworkSpec, int], ct_hu: np.ndarray, spacing: Sequence[float],
                   preprocessing: Preprocessing, threshold: Optional[float] = None, keep=None, device: DeviceLike = "auto",
                   batch_size: Optional[int] = None, progress: ProgressFn = None, should_cancel: CancelFn = None,
                   patch_size: Optional[Sequence[int]] = None, overlap: float = 0.5, weighting: str = "uniform",
                   amp: bool = True, domain: str = HU, compile: Optional[bool] = None, packed: bool = False) -> _Output:
    """Predict a CT into masks thresholded at ``threshold`` (if given; bit-packed with ``packed``,
    read them with ``.mask(channel)``) and/or probabilities kept as ``keep`` (float16 / float32, if
    given).  The model is moved to ``device`` and put in eval mode; ``compile`` (default: the ``COVIDSEG_COMPILE`` environment variable) runs it through
    ``torch.compile``.  ``batch_size`` (2D slices per forward pass) defaults to the network's
    setting for ``device``.  ``ct_hu`` may be a :class:`HandedOverCT` (the caller keeps no other
    reference): a 3D network then lets the CT go once its own volume is built.  See the module
    docstring for how 2D and 3D networks run."""
    ct, spacing = _check_input(ct_hu.take() if isinstance(ct_hu, HandedOverCT) else ct_hu, spacing)
    check_domain(domain)
    preprocessing.check_can_read(domain)
    dims, stride, default_patch = _spec_parts(spec_or_dims)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), not {overlap}")
    if weighting not in ("uniform", "gaussian"):
        raise InputError(f"unknown weighting {weighting!r}; use 'uniform' or 'gaussian'")
    dev = resolve_device(device)
    settings = settings_for(getattr(spec_or_dims, "name", None), dev, compile)
    run = _Run(prepare_model(model, dev, settings, dims, stride), dims, stride, preprocessing, domain, dev, settings,
               int(batch_size or settings.batch_size), amp, progress, should_cancel)
    _check_cancel(should_cancel)
    output = _Output(ct.shape, threshold, keep, packed)
    held = [ct]  # the 3D path takes the CT out: for a handed-over CT nothing else holds it then
    del ct
    with weights_layout(model, settings, dims), torch.inference_mode():
        if dims == 2:
            _predict_2d(run, held[0], output)
        else:
            _predict_3d(run, held, spacing, patch_size or default_patch, overlap, weighting, output)
    return output


def _predict_2d(run: _Run, ct: np.ndarray, output: _Output) -> None:
    """Batch by batch: into the network's domain, normalised, resized, predicted, resized back."""
    prep, step = run.preprocessing, run.batch_size
    stats = zscore_stats(run.chunks(ct, step), prep) if prep.normalisation == "zscore" else None
    resize = tuple(int(v) for v in prep.inplane_size) if prep.inplane_size else None
    total = math.ceil(ct.shape[0] / step)
    for k, (start, slices) in enumerate(zip(range(0, ct.shape[0], step), run.chunks(ct, step))):
        x = torch.from_numpy(np.ascontiguousarray(normalise(slices, prep, stats)))[:, None].to(run.device)
        if resize is not None:
            x = resize_inplane(x, resize)
        prob = resize_inplane(run.probabilities(x), ct.shape[1:]).clamp_(0.0, 1.0)
        output.put(start, prob.cpu())
        _call(run.progress, k + 1, total)


def _network_grid(run: _Run, shape: Tuple[int, int, int], spacing: Tuple[float, ...]) -> Tuple[int, int, int]:
    """The (z, y, x) size a 3D network sees: the CT mapped into its domain (an 8-bit mapping may
    change the in-plane size; the spacing follows), then resized to ``inplane_size`` (z kept) or
    resampled to ``target_spacing``."""
    prep = run.preprocessing
    mapped = prep.mapping.output_shape(shape) if prep.domain != run.domain else tuple(shape)
    spacing = (spacing[0],) + tuple(s * n / m for s, n, m in zip(spacing[1:], shape[1:], mapped[1:]))
    if prep.inplane_size is not None:  # 8-bit networks: slices resized, z kept (spacing unknown)
        return (int(mapped[0]),) + tuple(int(v) for v in prep.inplane_size)
    if prep.target_spacing is not None:
        return tuple(max(1, int(round(n * s / float(t)))) for n, s, t in zip(mapped, spacing, prep.target_spacing))
    return tuple(int(n) for n in mapped)


def _network_volume(run: _Run, ct: np.ndarray, grid: Tuple[int, int, int], step: int = 8) -> torch.Tensor:
    """The normalised float32 volume on the network's grid, built ``step`` CT slices at a time
    (clipped to the network's range, then resampled; statistics of the resampled volume)."""
    prep = run.preprocessing
    volume = torch.empty(grid, dtype=torch.float32)
    chunks = (torch.from_numpy(clip_to_domain(part, prep))[:, None] for part in run.chunks(ct, step))
    for start, part in resample_slices(chunks, ct.shape[0], grid):
        volume[start:start + part.shape[0]] = part[:, 0]
    parts = range(0, grid[0], step)  # statistics and normalisation a few slices at a time, in place
    stats = zscore_stats((volume[s:s + step].numpy() for s in parts), prep) if prep.normalisation == "zscore" else None
    for start in parts:
        volume[start:start + step] = normalise(volume[start:start + step], prep, stats)
    return volume


def _predict_3d(run: _Run, held: list, spacing, patch_size, overlap: float, weighting: str, output: _Output) -> None:
    """``held``: a list holding the CT, taken out (and let go) once the network's volume is built."""
    ct = held.pop()
    shape = ct.shape
    grid = _network_grid(run, shape, spacing)
    volume = _network_volume(run, ct, grid)
    del ct
    bands = _sliding_window(run, volume, patch_size, overlap, weighting)
    for start, part in resample_slices(bands, grid[0], shape):
        output.put(start, part.clamp_(0.0, 1.0))


def _sliding_window(run: _Run, volume: torch.Tensor, patch_size, overlap: float, weighting: str) -> Iterator[torch.Tensor]:
    """Overlap-averaged probabilities (n, 2, y, x) of consecutive slices of ``volume``, each band
    yielded as soon as no later patch reaches it (the sums are kept for one row of patches only)."""
    shape = tuple(volume.shape)
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise InputError(f"a 3D patch size must be three positive integers (D, H, W), not {patch_size}")
    patch = tuple(min(p, n) for p, n in zip(patch_size, shape))
    steps = tuple(max(1, int(p * (1.0 - overlap))) for p in patch)
    starts = [_starts(n, p, s) for n, p, s in zip(shape, patch, steps)]
    weight = _gaussian_weights(patch) if weighting == "gaussian" else torch.ones(patch)
    sums, weights, low = torch.zeros((0, 2) + shape[1:]), torch.zeros((0,) + shape[1:]), 0
    counter = {"done": 0, "total": len(starts[0]) * len(starts[1]) * len(starts[2])}
    for a in starts[0]:
        if a > low:  # slices above a are final: no later patch starts above a
            yield from _averages(sums[:a - low], weights[:a - low])
            sums, weights, low = sums[a - low:], weights[a - low:], a
        grow = a + patch[0] - low - sums.shape[0]
        if grow > 0:
            sums = torch.cat([sums, sums.new_zeros((grow, 2) + shape[1:])])
            weights = torch.cat([weights, weights.new_zeros((grow,) + shape[1:])])
        for b in starts[1]:
            for c in starts[2]:
                _check_cancel(run.should_cancel)
                region = (slice(b, b + patch[1]), slice(c, c + patch[2]))
                prob = run.probabilities(volume[(slice(a, a + patch[0]),) + region][None, None].to(run.device))
                band = (slice(a - low, a - low + patch[0]), slice(None)) + region
                sums[band] += prob[0].cpu().transpose(0, 1) * weight[:, None]
                weights[band[:1] + region] += weight
                counter["done"] += 1
                _call(run.progress, counter["done"], counter["total"])
    yield from _averages(sums, weights)


def _averages(sums: torch.Tensor, weights: torch.Tensor, step: int = 2) -> Iterator[torch.Tensor]:
    """The averaged probabilities of a finished band, a few slices at a time (small temporaries
    downstream, which the allocator reuses instead of growing the heap: a 512 x 512 CT's bands
    resized back two network slices at a time, not eight, lowered the peak of qchc_unet3d on a
    300-slice CT from ~605 to ~560 MB, in the same time)."""
    for start in range(0, sums.shape[0], step):
        yield sums[start:start + step] / weights[start:start + step, None]


# ------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------
@dataclass
class SegmentationResult:
    """Binary masks (uint8, 0/1) and, where asked for, the probabilities they were thresholded from."""

    lung: np.ndarray
    infection: np.ndarray
    probabilities: Optional[np.ndarray]  # (2, z, y, x) float16 / float32 (lung, infection), or None
    network: str = ""
    threshold: float = 0.5


def segment_volume(loaded, ct_hu: np.ndarray, spacing: Sequence[float], threshold: float = 0.5,
                   device: DeviceLike = "auto", probabilities: bool = False, probability_dtype="float16",
                   **kwargs) -> SegmentationResult:
    """Segment a CT with a :class:`~napari_covidseg.checkpoint.LoadedModel`.

    A voxel belongs to a mask when its probability is above ``threshold``.  The infection mask is
    not restricted to the lung mask (see the module docstring).  The probabilities are kept only
    with ``probabilities=True``, as ``probability_dtype`` (``"float16"``, half the memory, or
    ``"float32"``); the masks are thresholded from float32 either way.  ``kwargs`` go to
    :func:`run_prediction` (``batch_size``, ``progress``, ``should_cancel``, ``patch_size``,
    ``overlap``, ``weighting``, ``amp``, ``domain``, ``compile``).
    """
    output = segment_masks(loaded, ct_hu, spacing, threshold, device, probabilities, probability_dtype, **kwargs)
    return SegmentationResult(lung=output.mask(0), infection=output.mask(1), probabilities=output.probabilities,
                              network=loaded.network, threshold=float(threshold))


def segment_masks(loaded, ct_hu: np.ndarray, spacing: Sequence[float], threshold: float = 0.5,
                  device: DeviceLike = "auto", probabilities: bool = False, probability_dtype="float16",
                  packed: bool = False, **kwargs) -> _Output:
    """:func:`segment_volume`'s prediction, as the output it was gathered in: ``.mask(0)`` (lung) and
    ``.mask(1)`` (infection) give the uint8 masks, ``.probabilities`` the kept probabilities.  With
    ``packed`` the masks are held bit-packed (an eighth of the memory) until ``.mask`` unpacks one."""
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold must be between 0 and 1 (exclusive), not {threshold}")
    keep = _probability_dtype(probability_dtype) if probabilities else None
    return run_prediction(loaded.model, loaded.spec, ct_hu, spacing, loaded.preprocessing, threshold=float(threshold),
                          keep=keep, device=device, packed=packed, **kwargs)


def prepare_network(loaded, device: DeviceLike = "auto", compile: Optional[bool] = None) -> bool:
    """Build now what the first forward pass would build while the CT is in memory; True if it did.

    That is the ONNX Runtime session of a 2D network whose graph is exported at its full input
    size (``onnx_graph_per_size``: ``chs_net``, whose spectral maps are matrix products of one
    size).  Tracing it holds every intermediate map of a forward pass (about 190 MB for the
    shipped ``chs_net``), on top of the CT when done at the first slice; done before the CT is
    read, it is not.  Other networks trace a small crop and have nothing worth preparing.
    """
    spec, prep = loaded.spec, loaded.preprocessing
    dev = resolve_device(device)
    settings = settings_for(spec.name, dev, compile)
    if not (settings.onnx and spec.dims == 2 and prep.inplane_size and getattr(loaded.model, "onnx_graph_per_size", False)):
        return False
    dims, stride, _ = _spec_parts(spec)
    runner = prepare_model(loaded.model, dev, settings, dims, stride)
    with torch.inference_mode():
        _forward_logits(runner, torch.zeros((1, 1) + tuple(int(v) for v in prep.inplane_size)), stride)
    return True
