"""Drop-in pieces that run CHS-Net faster on CPU: same parameters, same ``state_dict``, same numbers.

Channels-last: CHS-Net's time goes into many cheap, memory-bound ops on wide maps (depthwise
convolutions, a 3x3 stride-1 max pool, BatchNorm), and PyTorch's CPU kernels for these are
several times faster on channels-last (NHWC) maps than on contiguous (NCHW) ones (measured for
CHS-Net: ``benchmarks/results/chs_net_speed.md``), so the network runs its maps channels-last.
The layout is a stride order only: shapes and values stay as they are.

* :func:`pointwise_conv` / :class:`PointwiseConv2d`: a 1x1 convolution as ``F.linear`` on the
  NHWC view (an ``nn.Conv2d`` subclass, parameters ``weight`` / ``bias`` as before), and the 1x1
  convolution of a concatenation computed part by part (:meth:`PointwiseConv2d.forward_parts`).
* :class:`DepthwiseConv2d`: a depthwise convolution whose 5x5 weight gradient is computed as
  forward convolutions (:func:`depthwise_weight_gradient`).
* :func:`cat_channels`: a concatenation along channels that stays channels-last.
* :func:`like_layout`: a result in the layout of the input it was computed from.

They compute the same sums in another order, so the results agree to float rounding.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

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


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight``, as ``F.linear`` on a channels-last map.

    On CPU, ``conv2d`` copies a channels-last input to the contiguous layout (and its gradient
    back) for 1x1 kernels; ``F.linear`` on the ``(N, H, W, C)`` view reads it in place and writes a
    channels-last result.  Same sums, so the same numbers up to float rounding.  A single-channel
    map fits both layouts and takes the matrix product too, so that the network's first layers
    (one input channel) already give channels-last maps.  While PyTorch exports a graph, the
    convolution itself (ONNX Runtime fuses it with the BatchNorm and ReLU after it).
    """
    if not x.is_contiguous(memory_format=torch.channels_last) or torch.onnx.is_in_onnx_export():
        return F.conv2d(x, weight, bias)
    # a contiguous weight (a slice of a split one is not) makes autograd compute the weight
    # gradient as grad^T @ x, which MKL runs about 10x faster than x^T @ grad for these shapes
    return F.linear(_nhwc(x), weight.flatten(1).contiguous(), bias).permute(0, 3, 1, 2)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters, same ``state_dict``) run by :func:`pointwise_conv`."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``self(cat_channels(parts))`` without building the concatenation.

        One matrix product per part with its slice of the weight (:meth:`weight_parts`), summed:
        the wide concatenation is neither written nor read, and its gradient needs no splitting.
        """
        weights = self.weight_parts([p.shape[1] for p in parts])
        out = pointwise_conv(parts[0], weights[0], self.bias)
        for part, weight in zip(parts[1:], weights[1:]):
            out = out.add_(pointwise_conv(part, weight))
        return out

    def weight_parts(self, in_channels: Sequence[int]) -> Tuple[torch.Tensor, ...]:
        """The weight split by input channels: the 1x1 convs that each part of a concatenation sees."""
        return self.weight.split(list(in_channels), dim=1)


def depthwise_weight_gradient(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weight gradient ``(C, 1, k, k)`` of a depthwise 'same' convolution (stride 1), from its input and output gradient.

    ``gw[c, i, j]`` is the sum over images of the correlation of input channel ``c`` with its output
    gradient at lag ``(i, j) - k // 2``: for one image that is a forward depthwise convolution of
    the input with the gradient as the (large) kernel, which oneDNN runs with its fast depthwise
    kernel.  Its own 5x5 depthwise weight gradient falls back to a generic grouped kernel that is
    2-3x slower than one such convolution per image.
    """
    channels, padding = x.shape[1], kernel_size // 2
    total = F.conv2d(x[:1], grad[0].unsqueeze(1), padding=padding, groups=channels)
    for n in range(1, x.shape[0]):
        total = total + F.conv2d(x[n:n + 1], grad[n].unsqueeze(1), padding=padding, groups=channels)
    return total.reshape(channels, 1, kernel_size, kernel_size)


class _DepthwiseConvFunction(torch.autograd.Function):
    """Depthwise 'same' convolution (odd kernel, stride 1, no bias) with :func:`depthwise_weight_gradient`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        channels, kernel_size = weight.shape[0], weight.shape[-1]
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            padding = [kernel_size // 2] * 2
            grad_input = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], padding, [1, 1], False, [0, 0], channels, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_gradient(x, grad, kernel_size)
        return grad_input, grad_weight


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``k x k`` convolution, stride 1, 'same' padding, no bias: an ``nn.Conv2d`` (same ``state_dict``).

    On CPU, kernels larger than 3x3 take their weight gradient from :func:`depthwise_weight_gradient`
    (for 3x3 oneDNN's own is faster); elsewhere this is ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size: int):
        if kernel_size % 2 != 1:
            raise ValueError(f"a 'same' depthwise convolution needs an odd kernel, not {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.kernel_size[0] <= 3:
            return super().forward(x)
        return _DepthwiseConvFunction.apply(x, self.weight)


def cat_channels(parts) -> torch.Tensor:
    """``torch.cat(parts, dim=1)`` laid out channels-last.

    ``torch.cat`` keeps channels-last only when every part is unambiguously channels-last; a
    single-channel part (the first block's branches) would make it fall back to contiguous.
    """
    return torch.cat(parts, dim=1).contiguous(memory_format=torch.channels_last)
