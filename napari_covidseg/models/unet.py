"""Plain 2D U-Net baseline (Ronneberger et al. 2015), the "U-Net" row of every paper's table.

Readings chosen
---------------
* 4 down-samplings (5 levels), two 3x3 Conv-BN-ReLU per level, max pooling, transposed-conv
  up-sampling, concatenation skips: the original design with BatchNorm added, as the papers'
  re-implementations do.  Padding keeps sizes; inputs that are not multiples of 16 are padded by
  the inference code and cropped back (``forward`` also pads/crops itself so any size works).
* Base width 64 as in the original (31 M parameters); the shipped variant uses ``base=16``.
* Loss: BCE + soft Dice on the two sigmoid channels (lung, infection).

Export form (ONNX Runtime, the CPU inference path): each decoder level's convolution of
[up-sampled, skip] is traced as two convolutions added (:func:`decode_level`), the same values up
to float rounding; 58.8 -> 56.3 ms a forward of the shipped variant (minimum of 90 interleaved
runs, 1 thread, 1 x 1 x 256 x 256; first quartile 60.1 -> 57.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..preprocessing import Preprocessing
from .channel_padding import onnx_channel_block
from .losses import BCEDiceLoss
from .registry import NetworkSpec, Recipe, register


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def pad_to_multiple(x: torch.Tensor, multiple: int):
    """Pad the trailing spatial dims of ``x`` (reflect where possible) to a multiple; returns (x, crop slices)."""
    spatial = x.shape[2:]
    pads = []
    for size in reversed(spatial):
        extra = (-size) % multiple
        pads += [extra // 2, extra - extra // 2]
    if not any(pads):
        return x, None
    mode = "reflect" if all(p < s for p, s in zip(pads[::2] + pads[1::2], list(reversed(spatial)) * 2)) else "replicate"
    x = F.pad(x, pads, mode=mode)
    crop = tuple(slice(pads[2 * i], pads[2 * i] + s) for i, s in enumerate(reversed(spatial)))[::-1]
    return x, crop


def crop_to(x: torch.Tensor, crop):
    if crop is None:
        return x
    return x[(slice(None), slice(None)) + tuple(crop)]


def unet_decoder(widths):
    """U-Net's decoder for encoder ``widths`` (finest first): per level a 2x2 transposed conv from
    the coarser level, then two Conv-BN-ReLU on [up-sampled, skip]; returns (ups, decoders)."""
    ups, decoders = nn.ModuleList(), nn.ModuleList()
    for w_low, w_high in zip(widths[::-1][:-1], widths[::-1][1:]):
        ups.append(nn.ConvTranspose2d(w_low, w_high, 2, stride=2))
        decoders.append(nn.Sequential(conv_bn_relu(2 * w_high, w_high), conv_bn_relu(w_high, w_high)))
    return ups, decoders


def folds_for_export(norm: nn.BatchNorm2d) -> bool:
    """Whether a form traced for ONNX Runtime may fold ``norm`` into a convolution: while exporting,
    in eval mode, with running statistics."""
    return torch.onnx.is_in_onnx_export() and not norm.training and norm.running_var is not None


def decode_level(block: nn.Sequential, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """One level of :func:`unet_decoder`: ``block(cat([up, skip]))``.

    While tracing for ONNX Runtime in eval mode, where both parts fill whole blocks of channels
    (:func:`.channel_padding.onnx_channel_block`), the first Conv-BN-ReLU's convolution of the
    concatenation is written as two convolutions added (``W [u; s] = W_u u + W_s s``), BatchNorm
    folded into both.  ONNX Runtime concatenated the maps in plain layout and reordered the result
    into its blocked one (msa_cpp_unet at full resolution: 2.7 ms a slice of 81); the two
    convolutions read the blocked maps directly, and the addition is fused into the second.
    Parts that are not whole blocks stay concatenated: ONNX Runtime pads each convolution's
    channels to whole blocks, so 24 + 24 channels would run as 32 + 32 in two convolutions instead
    of 48 in one (msa_cpp_unet at 1/2, profiled: 5.8 ms against 4.5 + 0.8 for the concatenation
    and its reorder).  Same values up to float rounding (tested)."""
    conv, norm, relu = block[0]
    if not (folds_for_export(norm) and up.shape[1] % onnx_channel_block() == 0
            and skip.shape[1] % onnx_channel_block() == 0):
        return block(torch.cat([up, skip], dim=1))
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    n = up.shape[1]
    first = F.conv2d(up, weight[:, :n], bias, padding=conv.padding)
    first = first + F.conv2d(skip, weight[:, n:], padding=conv.padding)
    return block[1:](relu(first))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 64, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.encoders.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.ups, self.decoders = unet_decoder(widths)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> dict:
        x, crop = pad_to_multiple(x, 2**self.depth)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = decode_level(dec, up(x), skips.pop())
        return {"logits": crop_to(self.head(x), crop)}


SPEC = register(
    NetworkSpec(
        name="unet",
        title="U-Net (baseline)",
        build=UNet,
        dims=2,
        loss=BCEDiceLoss,
        preprocessing=Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="minmax", inplane_size=(256, 256)),
        recipe=Recipe(optimizer="adam", lr=1e-3, weight_decay=1e-4, schedule="poly", epochs=100, batch_size=8,
                      input_size=(256, 256), augmentation=("flip", "rotate", "scale")),
        default_kwargs={"base": 64},
        shipped_kwargs={"base": 16},
        paper="Ronneberger, Fischer, Brox. U-Net. MICCAI 2015 (baseline in all four papers)",
        stride=16,
    )
)
