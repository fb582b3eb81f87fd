"""Inference copies of a network with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one convolution with
rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``).  Folding saves a pass
over every feature map: for ``ms_unet`` on the CPU, BatchNorm was 11 % of the forward.  The
result equals the unfolded network's to float rounding (the products are summed in another
order), which is why it is a per-network inference setting checked against the masks
(:mod:`napari_covidseg.inference_settings`).

Only the pairs a network states plainly are folded: a convolution directly followed by a
BatchNorm in an ``nn.Sequential`` (the ``conv_bn_relu`` blocks), BatchNorm with running
statistics.  The model itself is never changed: a copy is folded, and made again whenever the
model's weights change (the trainer validates between epochs with the same code).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .onnx_backend import WeightsWatch

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (any(type(conv) is c and type(bn) is b for c, b in _PAIRS) and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A folded copy of ``model`` in eval mode; returns the copy (``model`` is left as it is)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if _foldable(conv, bn):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return folded


class FoldedRunner:
    """Callable like the model; runs its folded copy, made again when the weights change."""

    def __init__(self, model: nn.Module, layout: torch.memory_format = torch.contiguous_format):
        self.model, self.layout = model, layout
        self.weights, self.version, self.folded = WeightsWatch(model), None, None

    def __call__(self, x: torch.Tensor):
        version = self.weights.version()
        if version != self.version or self.folded is None:
            device = next(self.model.parameters()).device
            self.folded = fold_batch_norms(self.model).to(device=device, memory_format=self.layout)
            self.version = version
        return self.folded(x)
