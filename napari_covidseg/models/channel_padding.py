"""Zero-padded copies of layers: a network's narrow stages widened without changing what it computes.

ONNX Runtime's CPU convolutions work on blocks of channels (16 with AVX-512, 8 with AVX2); a
stage whose width is not a multiple of the block is padded inside every convolution and its
tensors are reordered between layouts around the operators that cannot take the padding (e.g.
depthwise convolutions), on every call.  Widening such a stage in the weights instead (extra
channels whose weights, biases and BatchNorm affine parameters are zero) keeps those channels
exactly zero through convolutions, BatchNorm, ReLU and GELU, so the real channels' values are
unchanged, while the graph runs in one layout.

Every helper takes ``out_index`` / ``in_index``: where each original channel sits in the widened
layer (a 1-D long tensor), and the widened sizes.  Nothing here knows a particular network; a
network that reduces over its channels (a mean or max across them) must exclude the padding
itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def onnx_channel_block() -> int:
    """The channel block of ONNX Runtime's CPU convolutions here: 16 with AVX-512, else 8 (AVX2;
    read from PyTorch's own CPU dispatch level, which tests the same instruction sets)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def spread(channels: int, width: int, offset: int = 0) -> torch.Tensor:
    """Indices of ``channels`` original channels placed first in a block of ``width`` starting at ``offset``."""
    if width < channels:
        raise ValueError(f"cannot place {channels} channels in {width}")
    return torch.arange(channels) + offset


@torch.no_grad()
def padded_conv(conv: nn.Conv2d, out_index: torch.Tensor, out_channels: int,
                in_index: torch.Tensor, in_channels: int) -> nn.Conv2d:
    """``conv`` with ``out_channels`` outputs and ``in_channels`` inputs; depthwise convolutions
    (groups == channels) stay depthwise, with ``in_index`` equal to ``out_index``."""
    depthwise = conv.groups > 1
    if depthwise and not (conv.groups == conv.in_channels == conv.out_channels and in_channels == out_channels):
        raise ValueError("only plain and depthwise convolutions can be padded")
    wide = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     groups=out_channels if depthwise else 1, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)
    wide.weight.zero_()
    if depthwise:
        wide.weight[out_index] = conv.weight
    else:
        wide.weight[out_index[:, None], in_index[None, :]] = conv.weight
    if conv.bias is not None:
        wide.bias.zero_()
        wide.bias[out_index] = conv.bias
    return wide


@torch.no_grad()
def padded_transposed_conv(conv: nn.ConvTranspose2d, out_index: torch.Tensor, out_channels: int,
                           in_index: torch.Tensor, in_channels: int) -> nn.ConvTranspose2d:
    if conv.groups != 1:
        raise ValueError("only ungrouped transposed convolutions can be padded")
    wide = nn.ConvTranspose2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.output_padding, bias=conv.bias is not None, dilation=conv.dilation)
    wide.weight.zero_()
    wide.weight[in_index[:, None], out_index[None, :]] = conv.weight  # (in, out, k, k)
    if conv.bias is not None:
        wide.bias.zero_()
        wide.bias[out_index] = conv.bias
    return wide


@torch.no_grad()
def padded_batch_norm(norm: nn.BatchNorm2d, index: torch.Tensor, channels: int) -> nn.BatchNorm2d:
    """The padding channels map 0 to 0 (mean 0, variance 1, weight and bias 0)."""
    wide = nn.BatchNorm2d(channels, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    if norm.affine:
        wide.weight.zero_()
        wide.bias.zero_()
        wide.weight[index] = norm.weight
        wide.bias[index] = norm.bias
    if norm.track_running_stats:
        wide.running_mean[index] = norm.running_mean
        wide.running_var[index] = norm.running_var
        wide.num_batches_tracked.copy_(norm.num_batches_tracked)
    return wide.train(norm.training)
