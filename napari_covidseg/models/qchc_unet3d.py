"""QC-HC U-Net (Zhang, Ren, Wei; Scientific Reports 2021): 3D U-Net with quick connections and hypercolumns.

See SEEDS.md section 3.  The paper builds on the MIScnn pipeline (Mueller et al.): a 3D U-Net
on 160x160x80 patches of z-scored CT resampled to 1.58 x 1.58 x 2.70 mm.  Two changes:

* Quick connections in the encoder: in each encoder block the output of the first Conv-BN is
  summed with the output of the last Conv-BN (a residual shortcut with no learnable merge), and
  the block's input is concatenated to its output before going down (a dense-style connection),
  so every level sees its input again and gradients reach early layers on short paths.
* Hypercolumns in the decoder: every decoder level predicts class scores with a 1x1x1 conv; the
  scores are upsampled trilinearly to full size and summed, so coarse levels (context) and fine
  levels (boundaries) vote together on the final logits.

Readings chosen where the paper is ambiguous (configurable through the constructor)
---------------------------------------------------------------------------------
* Levels and widths: 5 levels, ``base * (1, 2, 4, 8, 16)`` = 32 ... 512 feature maps by default
  ("32 at full resolution, 512 at the lowest"), i.e. 4 down-samplings, stride 16 in every axis
  (160x160x80 patches divide by 16).
* Encoder block: Conv3x3x3-BN-ReLU (``a``), Conv3x3x3-BN (``b``), output ``relu(a + b)``: with
  MIScnn's two convolutions per level the "first" and "last" Conv-BN are these two.  The block
  returns ``cat(input, output)`` (``cin + w`` channels), which is both the skip and, after
  pooling, the next level's input.  The bottleneck is the same block without concatenation.
* Down-sampling: 2x2x2 max pooling (MIScnn's standard 3D U-Net).  ``pool_z_levels`` (default 4
  = all) sets how many of the 4 poolings also halve z; with fewer, the deep levels pool only in
  y and x (2x2x1), for thin patches of few slices.  The network pads every axis to a multiple of
  16 itself and crops back, so any patch size works.
* Up-sampling: 2x2x2 transposed convolution to the level's width (MIScnn's Conv3DTranspose).
* Decoder block: ``cat(up, skip)`` -> 1x1x1 Conv-BN-ReLU cutting the channels to the level's
  width (the paper's "1x1 conv + BN in the cascade to cut channels"), then two
  Conv3x3x3-BN-ReLU.
* Hypercolumns: the 4 decoder levels (not the bottleneck) each give 2 class scores by a 1x1x1
  conv; trilinear upsampling (``align_corners=False``) to full size; sum = final logits.
* Loss: Tversky (alpha = beta = 0.5, i.e. a soft Dice) + cross-entropy.  The paper uses softmax
  over {background, lung, infection} with categorical cross-entropy; this project's contract is
  two sigmoid channels (lung, infection: an infected voxel is also lung), so the cross-entropy is
  binary cross-entropy per channel and the Tversky index is computed per (sample, channel) on
  the sigmoid probabilities and averaged.  ``alpha``, ``beta`` and the two weights are constructor
  arguments of :class:`TverskyCELoss`.
* Preprocessing: clip HU to [-1250, 250], z-score (per volume at inference), resample to
  (z, y, x) = (2.70, 1.58, 1.58) mm; patches (D, H, W) = (80, 160, 160) with half-patch overlap at
  inference (done by :mod:`napari_covidseg.inference`).
* Recipe: Adam lr 1e-4, reduce-on-plateau x0.1 (paper).  The summary fixes neither the batch nor
  the epochs; MIScnn's defaults are 2 patches per batch and epochs of 150 iterations; here batch
  2 and 300 epochs (patience 20 epochs for the plateau), stated in ``Recipe.extra``.
  Augmentation: mirror, rotate, scale, elastic, gamma (0.5, 2), brightness (0.5, 2), contrast,
  Gaussian noise variance (0, 0.1), each with p = 0.15 (``Recipe.extra["augmentation_p"]``).
* Size (the paper gives none): default ``base=32`` 24.4 M parameters, 752 GFLOPs per
  80x160x160 patch; shipped ``base=8`` 1.53 M parameters, 48 GFLOPs (FlopCounterMode, see
  :data:`SIZES`).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..preprocessing import Preprocessing
from .losses import bce_loss, full_weight, mean_over_labelled
from .registry import NetworkSpec, Recipe, register
from .unet import crop_to, pad_to_multiple

# measured with torch.utils.flop_counter.FlopCounterMode on a (1, 1, 80, 160, 160) patch
# (re-measure with: model on the "meta" device, one forward under FlopCounterMode)
SIZES = {
    "default (base=32)": {"params_M": 24.373, "GFLOPs_80x160x160": 751.6},
    "shipped (base=8)": {"params_M": 1.530, "GFLOPs_80x160x160": 47.96},
}


def conv_bn(cin: int, cout: int, k: int = 3, relu: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv3d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm3d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class QuickConnectionBlock(nn.Module):
    """Conv-BN-ReLU, Conv-BN, first + last summed (quick connection), ReLU; input concatenated to the output."""

    def __init__(self, cin: int, cout: int, concat_input: bool = True):
        super().__init__()
        self.first = conv_bn(cin, cout)
        self.last = conv_bn(cout, cout, relu=False)
        self.concat_input = concat_input
        self.out_channels = cin + cout if concat_input else cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x)
        y = F.relu(a + self.last(a))
        return torch.cat([x, y], dim=1) if self.concat_input else y


class QCHCUNet3D(nn.Module):
    """3D U-Net with quick-connection encoder blocks and hypercolumn output; logits (B, 2, D, H, W)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 32, depth: int = 4,
                 pool_z_levels: int = 4):
        super().__init__()
        if not 0 <= pool_z_levels <= depth:
            raise ValueError(f"pool_z_levels must be between 0 and depth ({depth}), not {pool_z_levels}")
        widths = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.pool_kernels = [(2, 2, 2) if i < pool_z_levels else (1, 2, 2) for i in range(depth)]
        self.encoders = nn.ModuleList()
        skip_channels = []
        cin = in_channels
        for i, w in enumerate(widths):
            block = QuickConnectionBlock(cin, w, concat_input=i < depth)
            self.encoders.append(block)
            skip_channels.append(block.out_channels)
            cin = block.out_channels
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.hypercolumn_heads = nn.ModuleList()
        for level in range(depth - 1, -1, -1):
            w = widths[level]
            self.ups.append(nn.ConvTranspose3d(cin, w, self.pool_kernels[level], stride=self.pool_kernels[level]))
            self.decoders.append(nn.Sequential(conv_bn(w + skip_channels[level], w, k=1), conv_bn(w, w), conv_bn(w, w)))
            self.hypercolumn_heads.append(nn.Conv3d(w, out_channels, 1))
            cin = w

    def forward(self, x: torch.Tensor) -> dict:
        x, crop = pad_to_multiple(x, 2**self.depth)
        full_size = x.shape[2:]
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool3d(x, self.pool_kernels[i - 1]))
            skips.append(x)
        x = skips.pop()
        logits = 0
        for up, dec, head in zip(self.ups, self.decoders, self.hypercolumn_heads):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            scores = head(x)
            if scores.shape[2:] != full_size:
                scores = F.interpolate(scores, size=full_size, mode="trilinear", align_corners=False)
            logits = logits + scores
        return {"logits": crop_to(logits, crop)}


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, beta: float = 0.5,
                 eps: float = 1.0, weight=None) -> torch.Tensor:
    """1 - Tversky index TP / (TP + alpha FP + beta FN) per (sample, channel) on sigmoid probabilities,
    over the known voxels, averaged over the (sample, channel) pairs that have any."""
    prob = torch.sigmoid(logits)
    w = full_weight(weight, prob)
    dims = tuple(range(2, logits.ndim))
    tp = (w * prob * target).sum(dims)
    fp = (w * prob * (1 - target)).sum(dims)
    fn = (w * (1 - prob) * target).sum(dims)
    return mean_over_labelled(1.0 - (tp + eps) / (tp + alpha * fp + beta * fn + eps), weight)


class TverskyCELoss(nn.Module):
    """``tversky_weight * Tversky(alpha, beta) + ce_weight * BCE`` (paper: alpha = beta = 0.5, weights 1)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, tversky_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.tversky_weight, self.ce_weight = tversky_weight, ce_weight

    def forward(self, outputs: dict, target: torch.Tensor, progress: float = 0.0, weight=None):
        logits = outputs["logits"]
        tversky = tversky_loss(logits, target, self.alpha, self.beta, weight=weight)
        ce = bce_loss(logits, target, weight)
        total = self.tversky_weight * tversky + self.ce_weight * ce
        return total, {"tversky": float(tversky.detach()), "bce": float(ce.detach())}


AUGMENTATION = ("mirror", "rotate", "scale", "elastic", "gamma", "brightness", "contrast", "noise")

SPEC = register(
    NetworkSpec(
        name="qchc_unet3d",
        title="QC-HC U-Net (3D)",
        build=QCHCUNet3D,
        dims=3,
        loss=TverskyCELoss,
        preprocessing=Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="zscore",
                                    target_spacing=(2.70, 1.58, 1.58)),
        recipe=Recipe(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="plateau", epochs=300, batch_size=2,
                      input_size=(80, 160, 160), augmentation=AUGMENTATION,
                      extra={"augmentation_p": 0.15, "gamma_range": (0.5, 2.0), "brightness_range": (0.5, 2.0),
                             "noise_variance": (0.0, 0.1), "plateau_factor": 0.1, "plateau_patience": 20,
                             "iterations_per_epoch": 150, "inference_overlap": 0.5}),
        default_kwargs={"base": 32},
        shipped_kwargs={"base": 8},
        paper="Zhang, Ren, Wei. QC-HC U-Net: 3D U-Net with quick connections and hypercolumns for COVID-19 "
              "CT segmentation (title abridged). Scientific Reports 2021",
        stride=16,
    )
)
