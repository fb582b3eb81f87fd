"""Drop-in layers that run CHS-Net faster on CPU: same parameters, same ``state_dict``, same numbers.

Channels-last: CHS-Net's time goes into many cheap, memory-bound ops on wide maps (depthwise
convolutions, a 3x3 stride-1 max pool, BatchNorm), and PyTorch's CPU kernels for these are
several times faster on channels-last (NHWC) maps than on contiguous (NCHW) ones (measured for
CHS-Net: ``benchmarks/results/chs_net_speed.md``), so the network runs its maps channels-last.
The layout is a stride order only: shapes and values stay as they are.

:class:`PointwiseConv2d` is an ``nn.Conv2d`` subclass (parameters ``weight`` / ``bias`` as
before) with a faster forward on channels-last maps; it computes the same sums in another order,
so the results agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4D tensor laid out channels-last and not also contiguous (e.g. not one channel)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def like_layout(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout of ``reference`` (channels-last or contiguous); no copy if it already is."""
    layout = torch.channels_last if is_channels_last(reference) else torch.contiguous_format
    return x.contiguous(memory_format=layout)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """The ``(N, H, W, C)`` view of a channels-last ``(N, C, H, W)`` map (no copy)."""
    return x.permute(0, 2, 3, 1)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters, same ``state_dict``) run as a matrix product on channels-last maps.

    On CPU, ``conv2d`` copies a channels-last input to the contiguous layout (and its gradient
    back) for 1x1 kernels; ``F.linear`` on the ``(N, H, W, C)`` view reads it in place and writes a
    channels-last result.  Same sums, so the same numbers up to float rounding.  A single-channel
    map fits both layouts and takes the matrix product too, so that the network's first layers
    (one input channel) already give channels-last maps.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):  # also true for a single channel
            return super().forward(x)
        return F.linear(_nhwc(x), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)

    def forward_parts(self, parts) -> torch.Tensor:
        """``self(cat_channels(parts))`` without building the concatenation.

        One matrix product per part with its slice of the weight, summed: the wide concatenation
        is neither written nor read, and its gradient needs no splitting.
        """
        if not all(p.is_contiguous(memory_format=torch.channels_last) for p in parts):
            return self(cat_channels(parts))
        weights = self.weight.flatten(1).split([p.shape[1] for p in parts], dim=1)
        out = F.linear(_nhwc(parts[0]), weights[0], self.bias)
        for part, weight in zip(parts[1:], weights[1:]):
            # F.linear, not addmm_(part, weight.t()): the backward of the latter computes the weight
            # gradient as part^T @ grad, which MKL runs ~10x slower than linear's grad^T @ part
            out = out.add_(F.linear(_nhwc(part), weight))
        return out.permute(0, 3, 1, 2)


def cat_channels(parts) -> torch.Tensor:
    """``torch.cat(parts, dim=1)`` laid out channels-last.

    ``torch.cat`` keeps channels-last only when every part is unambiguously channels-last; a
    single-channel part (the first block's branches) would make it fall back to contiguous.
    """
    return torch.cat(parts, dim=1).contiguous(memory_format=torch.channels_last)
