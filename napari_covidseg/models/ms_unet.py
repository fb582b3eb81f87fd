"""MS-UNet: multi-scale U-shaped network (Liu, Si, Tang, Cai; ITC 2024), see SEEDS.md section 1.

What the network does and why
-----------------------------
Infection lesions range from a few pixels of ground glass to whole-lobe consolidation, so one
U-Net encoder (shared weights) looks at the slice three times: at 0.5x, 1.0x (the "main" scale)
and 1.5x.  Per encoder level a Scale Integration Module (SIM) lets every pixel choose, through a
softmax over three attention maps, how much of each scale it trusts.  The decoder replaces U-Net's
concatenation by a Hierarchical Mixed Module (HMM) that mixes channel groups step by step, so that
the fused features carry several receptive fields.  Both modules follow ZoomNet's SIU and HMU
(Pang et al., CVPR 2022), the reference the paper builds on.

Readings chosen where the paper is ambiguous (all configurable through the constructor)
-------------------------------------------------------------------------------------
* Encoder: the plain U-Net encoder (5 levels, two 3x3 Conv-BN-ReLU per level, 2x2 max pooling),
  widths ``base * (1, 2, 4, 8, 16)``; the same weights run on the three scales.  The 0.5x and
  1.5x inputs are bilinear resizes of the (padded) main input.
* Channel reduction: as in ZoomNet, every level's features pass a 1x1 Conv-BN-ReLU (shared across
  scales) down to ``mid`` channels before the SIM; a reduction never widens, so levels narrower
  than ``mid`` keep their width (with the defaults: 32, 64, 144, 144, 144 channels).
* SIM: 1.5x branch = 3x3 CBR, then "hybrid pooling" = adaptive max pooling + adaptive average
  pooling to the main size (summed, ZoomNet's reading), then 3x3 CBR; 0.5x branch = 3x3 CBR,
  bilinear up-sampling, 3x3 CBR; main branch = 3x3 CBR.  Generator: 1x1 CBR (3*mid -> mid),
  ``generator_depth`` (default 2) 3x3 CBR, 1x1 conv to 3 channels, softmax over the 3.
* HMM: 1x1 CBR expands ``mid`` to ``groups * hidden`` (``groups`` = 4, ``hidden`` = mid // 2,
  ZoomNet's values); group 1 goes through a 3x3 CBR that outputs 3 sets; group j > 1
  concatenates its own slice with set 2 of group j-1 and does the same (the last group outputs
  only 2 sets, since nothing follows it).  Of the sets, set 1 is the group's feature output,
  set 2 is handed to the next group, the last set drives channel modulation: the last sets of all
  groups are globally average-pooled, passed through a 2-layer MLP and a softmax over channels
  (the "gate"), which scales the concatenated feature outputs.  A 3x3 Conv-BN fuses the groups back
  to ``mid`` channels, the module input is added (residual) and a ReLU applied.
* Decoder: top-down like ZoomNet: ``x = HMM_5(SIM_5)``; for levels 4..1:
  ``x = HMM_i(SIM_i + up(P_i(x)))`` (bilinear up-sampling, addition; ``P_i`` a 1x1 CBR where the
  deeper level is wider).  Level 1 is at full resolution (U-Net encoder), so the head, a 1x1 conv
  to 2 channels (lung, infection), needs no up-sampling.
* Loss: BCE + gamma(progress) * UAL with UAL = mean(1 - |2 sigmoid(logits) - 1|^2) on both
  channels; gamma follows ZoomNet's cosine ramp ``gamma_min + (gamma_max - gamma_min) *
  (1 - cos(pi * progress)) / 2`` with ZoomNet's endpoints gamma_min = 0, gamma_max = 1.
* Size: the paper gives 13.40 M parameters / 23.83 GFLOPs at 256x256 but not the widths.  With
  1 input and 2 output channels, ``base=32, mid=144`` gives 13.11 M parameters (mid=128: 11.9 M)
  and FlopCounterMode reports 91.1 GFLOPs (45.5 G multiply-adds) at 1x1x256x256.  The U-Net
  encoder alone, run at 0.5x + 1x + 1.5x (3.5 times the pixels of one pass), costs about 30
  GFLOPs (15 G multiply-adds); if the paper's 23.83 "GFLOPs" are multiply-adds (the thop
  convention), its SIM/HMM must be lighter than ours, whose full-resolution level-1 modules
  dominate the count; the paper does not say how.  The shipped variant (``base=8, mid=32``) has
  0.75 M parameters and 5.6 GFLOPs.
* Input sizes: the main input is padded to a multiple of 32 so the 0.5x copy still divides by 16;
  the output is cropped back, so any size works.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..preprocessing import Preprocessing
from .losses import bce_loss, weighted_mean
from .registry import NetworkSpec, Recipe, register
from .unet import conv_bn_relu, crop_to, pad_to_multiple

SCALES = (0.5, 1.0, 1.5)


class UNetEncoder(nn.Module):
    """The 5-level U-Net encoder; returns the features of every level (full resolution first)."""

    def __init__(self, in_channels: int, widths):
        super().__init__()
        self.levels = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.levels.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w

    def forward(self, x: torch.Tensor):
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats


def hybrid_pool(x: torch.Tensor, size) -> torch.Tensor:
    """Bring a larger map down to ``size``: adaptive max pooling + adaptive average pooling.

    Max keeps small bright details (a tiny lesion seen at 1.5x), average keeps the smooth context.
    ONNX has no adaptive pooling for a ratio that is not an integer (1.5x -> 1x is not), so an
    ONNX export runs the same windows as gathers (:func:`adaptive_pool_by_gathers`).
    """
    if torch.onnx.is_in_onnx_export():
        if all(int(n) * 2 == int(m) * 3 for n, m in zip(x.shape[2:], size)):
            return pool_three_to_two(x)
        return adaptive_pool_by_gathers(x, size, "max") + adaptive_pool_by_gathers(x, size, "mean")
    return F.adaptive_max_pool2d(x, size) + F.adaptive_avg_pool2d(x, size)


def pool_three_to_two(x: torch.Tensor) -> torch.Tensor:
    """``hybrid_pool`` from ``3k`` to ``2k`` per axis (the 1.5x branch always is: the input is
    padded to a multiple of 32) without gathers.  Every adaptive window is then a pair of rows
    (and of columns): ``3i, 3i+1`` or ``3i+1, 3i+2``.  Rows first, then columns, each pair is
    reduced from strided slices (max, and sum / 4 for the mean), so only the kept windows are
    computed.  The same values as adaptive pooling (the mean to float rounding), as slices ONNX
    Runtime runs ~20x faster than the gathers (and than a 2 x 2 stride-1 pooling of every window
    followed by slices: 3 % of ``ms_unet``'s forward)."""
    return (_pairs_of_three(_pairs_of_three(x, 2, torch.maximum), 3, torch.maximum)
            + _pairs_of_three(_pairs_of_three(x, 2, torch.add), 3, torch.add) * 0.25)


def _pairs_of_three(x: torch.Tensor, dim: int, reduce) -> torch.Tensor:
    """Along ``dim`` (length ``3k``): ``reduce`` of items ``3i, 3i+1`` then of ``3i+1, 3i+2``, in
    that order (length ``2k``)."""
    a, b, c = (x[tuple(slice(o, None, 3) if d == dim else slice(None) for d in range(x.ndim))] for o in range(3))
    return torch.stack([reduce(a, b), reduce(b, c)], dim=dim + 1).flatten(dim, dim + 1)


def softmax_over_three(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=1)`` of a ``(B, 3, H, W)`` map.  In an ONNX export it is written out
    from the three channels: ONNX Runtime's Softmax over the channel axis of NCHW took 2.8 ms on
    ``3 x 256 x 256`` (3 % of ``ms_unet``'s forward), the elementwise form a fraction of that."""
    if not torch.onnx.is_in_onnx_export():
        return torch.softmax(x, dim=1)
    a, b, c = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    e = torch.exp(x - torch.maximum(torch.maximum(a, b), c))
    return e / (e[:, 0:1] + e[:, 1:2] + e[:, 2:3])


def adaptive_pool_by_gathers(x: torch.Tensor, size, reduce: str) -> torch.Tensor:
    """``F.adaptive_max_pool2d`` / ``F.adaptive_avg_pool2d`` of (B, C, H, W) ``x`` written with
    index gathers, one axis at a time (a window of adaptive pooling is a product of one window per
    axis, PyTorch's: ``floor(i * n / m) .. ceil((i + 1) * n / m)``).  Max is exact; the mean
    differs by float rounding only (it divides per axis, not once by the area)."""
    for dim, n_out in ((2, int(size[0])), (3, int(size[1]))):
        n_in = int(x.shape[dim])
        starts = [(i * n_in) // n_out for i in range(n_out)]
        counts = [-(-((i + 1) * n_in) // n_out) - s for i, s in enumerate(starts)]
        picks = [x.index_select(dim, torch.tensor([s + min(k, c - 1) for s, c in zip(starts, counts)], device=x.device))
                 for k in range(max(counts))]
        if reduce == "max":
            x = functools.reduce(torch.maximum, picks)
        else:
            shape = [1, 1, 1, 1]
            shape[dim] = n_out
            weights = [torch.tensor([float(k < c) / c for c in counts], dtype=x.dtype, device=x.device).view(shape)
                       for k in range(len(picks))]
            x = sum(p * w for p, w in zip(picks, weights))
    return x


class ScaleIntegration(nn.Module):
    """SIM: per-pixel softmax weights over the 0.5x, 1.0x and 1.5x features of one level."""

    def __init__(self, channels: int, generator_depth: int = 2):
        super().__init__()
        c = channels
        self.large_pre, self.large_post = conv_bn_relu(c, c), conv_bn_relu(c, c)
        self.small_pre, self.small_post = conv_bn_relu(c, c), conv_bn_relu(c, c)
        self.main = conv_bn_relu(c, c)
        layers = [conv_bn_relu(3 * c, c, k=1)]
        layers += [conv_bn_relu(c, c) for _ in range(generator_depth)]
        layers.append(nn.Conv2d(c, 3, 1))
        self.generator = nn.Sequential(*layers)

    def attention(self, small: torch.Tensor, main: torch.Tensor, large: torch.Tensor):
        """Aligned branch features (small, main, large) and the softmax maps ``(B, 3, H, W)``."""
        size = main.shape[2:]
        large = self.large_post(hybrid_pool(self.large_pre(large), size))
        small = self.small_post(F.interpolate(self.small_pre(small), size=size, mode="bilinear", align_corners=False))
        main = self.main(main)
        attn = softmax_over_three(self.generator(torch.cat([small, main, large], dim=1)))
        return small, main, large, attn

    def forward(self, small: torch.Tensor, main: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        small, main, large, attn = self.attention(small, main, large)
        return attn[:, 0:1] * small + attn[:, 1:2] * main + attn[:, 2:3] * large


class HierarchicalMixing(nn.Module):
    """HMM: channel groups processed in a chain, each handing part of its output to the next."""

    def __init__(self, channels: int, groups: int = 4, hidden: int = None):
        super().__init__()
        if groups < 2:
            raise ValueError("HMM needs at least 2 groups")
        hidden = hidden or max(channels // 2, 1)
        self.groups, self.hidden = groups, hidden
        self.expand = conv_bn_relu(channels, groups * hidden, k=1)
        self.interact = nn.ModuleList([conv_bn_relu(hidden, 3 * hidden)])
        for _ in range(1, groups - 1):
            self.interact.append(conv_bn_relu(2 * hidden, 3 * hidden))
        self.interact.append(conv_bn_relu(2 * hidden, 2 * hidden))
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(groups * hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, groups * hidden, 1),
            nn.Softmax(dim=1),
        )
        self.fuse = nn.Sequential(nn.Conv2d(groups * hidden, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.expand(x).chunk(self.groups, dim=1)
        features, pooled = [], []
        passed = None
        pool, mlp = self.gate[0], self.gate[1:]
        for j, (part, block) in enumerate(zip(parts, self.interact)):
            inp = part if passed is None else torch.cat([part, passed], dim=1)
            out = block(inp)
            if j < self.groups - 1:
                feat, passed, mod = out.chunk(3, dim=1)
            else:
                feat, mod = out.chunk(2, dim=1)
            features.append(feat)
            # the gate reads only the global average of each modulator channel: pooling each
            # group's modulators and concatenating the averages equals pooling their concatenation,
            # without copying the full-size maps into one tensor
            pooled.append(pool(mod))
        gate = mlp(torch.cat(pooled, dim=1))
        return F.relu(self.fuse(torch.cat(features, dim=1) * gate) + x)


class MSUNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 32, mid: int = 144,
                 hmm_groups: int = 4, generator_depth: int = 2, scales=SCALES):
        super().__init__()
        if tuple(scales) != SCALES:
            raise ValueError(f"MS-UNet uses the scales {SCALES}, got {tuple(scales)}")
        widths = [base * 2**i for i in range(5)]
        # reduction only ever reduces: shallow levels narrower than ``mid`` keep their width
        self.level_widths = [min(w, mid) for w in widths]
        self.encoder = UNetEncoder(in_channels, widths)
        self.reduce = nn.ModuleList([conv_bn_relu(w, c, k=1) if w != c else nn.Identity()
                                     for w, c in zip(widths, self.level_widths)])
        self.sims = nn.ModuleList([ScaleIntegration(c, generator_depth) for c in self.level_widths])
        self.hmms = nn.ModuleList([HierarchicalMixing(c, hmm_groups) for c in self.level_widths])
        # top-down: the deeper decoder output is projected to the next level's width (1x1 CBR)
        self.project = nn.ModuleList([conv_bn_relu(deep, c, k=1) if deep != c else nn.Identity()
                                      for c, deep in zip(self.level_widths[:-1], self.level_widths[1:])])
        self.head = nn.Conv2d(self.level_widths[0], out_channels, 1)

    def _features(self, x: torch.Tensor):
        per_scale = []
        for scale in SCALES:
            xs = x if scale == 1.0 else _rescaled(x, scale)
            per_scale.append([red(f) for red, f in zip(self.reduce, self.encoder(xs))])
        return per_scale  # [small, main, large], each a list of 5 levels

    def forward(self, x: torch.Tensor) -> dict:
        x, crop = pad_to_multiple(x, 32)
        small, main, large = self._features(x)
        fused = [sim(s, m, l) for sim, s, m, l in zip(self.sims, small, main, large)]
        y = self.hmms[-1](fused[-1])
        for level in range(len(fused) - 2, -1, -1):
            up = F.interpolate(self.project[level](y), size=fused[level].shape[2:], mode="bilinear",
                               align_corners=False)
            y = self.hmms[level](fused[level] + up)
        return {"logits": crop_to(self.head(y), crop)}


def _rescaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` resized bilinearly to ``round(n * scale)`` per axis.  An export states it as a scale
    factor (the sizes then follow the input's in the graph, instead of being held as constants):
    the same sizes and sampling for the padded input, whose sizes are multiples of 32."""
    if torch.onnx.is_in_onnx_export():
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True)
    return F.interpolate(x, size=[round(int(s) * scale) for s in x.shape[2:]], mode="bilinear", align_corners=False)


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """ZoomNet's cosine schedule: ``start`` at progress 0, ``end`` at 1, flat at both ends."""
    p = min(max(float(progress), 0.0), 1.0)
    return start + (end - start) * (1.0 - math.cos(math.pi * p)) / 2.0


def uncertainty_aware_loss(logits: torch.Tensor, weight=None) -> torch.Tensor:
    """UAL = mean(1 - |2p - 1|^2): 1 where the network hesitates (p = 0.5), 0 where it is sure
    (averaged over the voxels whose label is known, like the BCE it is added to)."""
    return weighted_mean(1.0 - (2.0 * torch.sigmoid(logits) - 1.0).pow(2), weight)


class BCEUncertaintyLoss(nn.Module):
    """BCE + gamma * UAL, gamma rising on a cosine ramp so certainty is demanded only late."""

    def __init__(self, gamma_min: float = 0.0, gamma_max: float = 1.0):
        super().__init__()
        self.gamma_min, self.gamma_max = gamma_min, gamma_max

    def gamma(self, progress: float) -> float:
        return cosine_ramp(progress, self.gamma_min, self.gamma_max)

    def forward(self, outputs: dict, target: torch.Tensor, progress: float = 0.0, weight=None):
        logits = outputs["logits"]
        bce = bce_loss(logits, target, weight)
        ual = uncertainty_aware_loss(logits, weight)
        gamma = self.gamma(progress)
        total = bce + gamma * ual
        return total, {"bce": float(bce.detach()), "ual": float(ual.detach()), "gamma": gamma}


SPEC = register(
    NetworkSpec(
        name="ms_unet",
        title="MS-UNet (multi-scale U-Net, SIM + HMM)",
        build=MSUNet,
        dims=2,
        loss=BCEUncertaintyLoss,
        preprocessing=Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="minmax", inplane_size=(256, 256)),
        recipe=Recipe(optimizer="adam", lr=1e-3, weight_decay=1e-4, schedule="poly", epochs=100, batch_size=8,
                      input_size=(256, 256), augmentation=("flip", "rotate")),
        default_kwargs={"base": 32, "mid": 144},
        shipped_kwargs={"base": 8, "mid": 32},
        paper="Liu, Si, Tang, Cai. MS-UNet: a multi-scale U-shaped network for COVID-19 lung infection "
              "segmentation. ITC 2024 (SIM/HMM after Pang et al., ZoomNet, CVPR 2022)",
        stride=32,
    )
)
