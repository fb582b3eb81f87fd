"""Volumes a few slices at a time: linear resampling of a volume that arrives (and leaves) as
consecutive chunks of slices, so no whole-volume float copy is ever needed.

:func:`resample_slices` gives what ``torch.nn.functional.interpolate(mode="trilinear",
align_corners=False)`` gives on the whole volume (to float rounding: the trilinear weights are the
product of a linear weight along z and the bilinear weights in-plane, applied here one after the
other), while holding only the two source slices each output slice needs.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def linear_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second source index, weight of the second) of each output index of
    a linear resampling from ``n_in`` to ``n_out`` samples, as PyTorch computes them
    (``align_corners=False``: source = (i + 0.5) * n_in / n_out - 0.5, clamped at 0, in float32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    source = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    first = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    weight = np.clip(source - first.astype(np.float32), 0.0, 1.0).astype(np.float32)
    second = np.minimum(first + 1, n_in - 1)
    return first, second, weight


def resize_inplane(chunk: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (k, C, h, w) slices to ``size`` = (H, W) (unchanged when equal)."""
    size = tuple(int(s) for s in size)
    if tuple(chunk.shape[-2:]) == size:
        return chunk
    return F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)


def resample_slices(chunks: Iterable[torch.Tensor], n_in: int, size: Sequence[int]) -> Iterator[Tuple[int, torch.Tensor]]:
    """Resample a volume of ``n_in`` slices, given as consecutive chunks ``(k, C, h, w)``, to
    ``size`` = (Z, H, W); yields ``(first output slice, (m, C, H, W) float32)`` in order.

    An output chunk is yielded as soon as the source slices it needs have arrived; source slices
    no later output needs are dropped.  With Z == ``n_in`` each chunk is only resized in-plane.
    """
    n_out, hw = int(size[0]), tuple(int(s) for s in size[1:])
    if n_out == n_in:
        start = 0
        for chunk in chunks:
            yield start, resize_inplane(chunk.float(), hw)
            start += chunk.shape[0]
        return
    first, second, weight = linear_taps(n_in, n_out)
    buffer, offset, done = [], 0, 0  # buffer[i] is source slice offset + i
    for chunk in chunks:
        buffer.extend(resize_inplane(chunk.float(), hw).unbind(0))
        ready = done
        while ready < n_out and second[ready] < offset + len(buffer):
            ready += 1
        if ready == done:
            continue
        a = torch.stack([buffer[i - offset] for i in first[done:ready]])
        b = torch.stack([buffer[i - offset] for i in second[done:ready]])
        w = torch.from_numpy(weight[done:ready]).view(-1, 1, 1, 1)
        yield done, (1.0 - w) * a + w * b
        done = ready
        drop = (int(first[done]) - offset) if done < n_out else len(buffer)
        buffer, offset = buffer[drop:], offset + drop
