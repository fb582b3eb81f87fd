"""CHS-Net (Punn, Agarwal 2021): two cascaded RAIU-Nets, lungs first, then infection inside them.

See SEEDS.md section 4.  The paper segments hierarchically: a first RAIU-Net finds the lungs on
the CT slice, and a second one, given the CT and the first net's lung map, finds the infection,
so the infection search is restricted to the lungs.

RAIU-Net (residual attention inception U-Net)
---------------------------------------------
* Encoder: ``depth + 1`` levels (default 4 down-samplings: 4 encoder stages plus the bottleneck,
  the U-Net layout, so the network stride is 16); widths ``base * 1.5**level`` (rounded to an
  even number), spatial size halved between levels by :class:`HybridPool2d` (2x2 max pooling and
  spectral pooling in parallel, concatenated, 1x1 Conv-BN-ReLU).
* Every U-Net "double 3x3 conv" is one residual inception block (:class:`ResidualInceptionBlock`):
  two inception convolutions in a row, plus a shortcut (3x3 depthwise-separable conv + BN) from
  the block input, added to the second inception output, then ReLU.
* Inception convolution (:class:`InceptionConv`): four parallel branches, depthwise-separable
  1x1, 3x3 and 5x5 convolutions and a stride-1 hybrid pooling branch (3x3 stride-1 max pool and a
  spectral low-pass keeping the central half of the frequencies, concatenated, 1x1 conv), each
  followed by BN + ReLU; the four are concatenated and merged by a 1x1 Conv-BN-ReLU.
* Skips: spectral spatial-and-depth attention (:class:`SpectralSpatialDepthAttention`) before
  the concatenation with the up-sampled decoder features; up-sampling by 2x2 transposed conv;
  output: 1x1 conv, read through a sigmoid.

Readings chosen where the paper is ambiguous (configurable through the constructor)
---------------------------------------------------------------------------------
* "4 stages": read as 4 down-samplings (U-Net layout, stride 16), ``depth=4``; ``depth=3`` gives
  4 levels in all (stride 8).
* "Each 2D conv replaced by a RIB": one RIB replaces the two 3x3 convolutions of each U-Net
  level (its two inception convolutions play their role), in encoder and decoder.
* Depthwise-separable "1x1" branch: a depthwise 1x1 is only a per-channel scale, so the branch is
  a plain 1x1 conv.  Every other separable conv is depthwise kxk (no bias) + pointwise 1x1.
* Inception branch width: ``out_channels // 4`` (at least 4) per branch, so the concatenation
  has about ``out_channels`` channels before the 1x1 merge.
* The channel increase (x1.5) happens in the first inception conv of each level's RIB (and in its
  shortcut); the hybrid pooling keeps the width.
* Hybrid pooling branch at stride 1: see :mod:`.spectral_pooling` (3x3 max pool + spectral
  low-pass, since spectral pooling at the same size would be the identity).
* ReLU after the residual addition (standard residual block; the paper's figure shows the sum as
  the block output).
* SSD attention on the skip ``x`` (finer level, C channels) gated by ``g``, the decoder features
  of the next coarser level before up-sampling (Attention U-Net, Oktay et al. 2018):
  depth attention first, ``x <- x * sigmoid(W2 relu(W1 mean(x)))`` with 1x1 convs C -> C/2 -> C
  (the global spectral pool is the DC term = mean; the paper does not name the final
  activation, sigmoid as in squeeze-and-excitation); then spatial attention,
  ``a = sigmoid(psi(relu(theta(x) + phi(g))))`` with ``theta`` a 2x2 stride-2 conv on the skip
  (the "strided conv of the previous level's features"), ``phi`` a 1x1 conv on the gate,
  ``psi`` a 1x1 conv to one channel, ``a`` upsampled bilinearly to the skip's size, ``x <- x * a``.
  Intermediate width C/2.
* Cascade: the second RAIU-Net gets ``cat(ct, sigmoid(lung_logits))`` (2 input channels).  The
  lung map is detached (``detach_lung_map=True``): each net is trained on its own target only,
  the lung net on the lung and the infection net on the infection, as in the paper's
  hierarchical training; the infection net still sees where the lungs are.
* "Restrict the infection search to the lungs": in eval mode (inference) the infection logits are
  replaced by ``min(infection_logits, lung_logits)``, the logit of ``min(p_inf, p_lung)`` (fuzzy
  AND), so at the 0.5 threshold infection is predicted only inside the predicted lung.  In
  training mode the raw infection logits are returned, so the infection net's loss is not
  masked by a lung net that is still learning.  ``restrict_to_lung=False`` turns the masking off;
  the raw logits are always available as ``outputs["infection_raw_logits"]``.
* Loss: 0.5 BCE + 0.5 soft Dice on both channels (lung net on lung, infection net on infection).
* Size: the paper reports 4.2 M parameters without saying whether per RAIU-Net or for the whole
  cascade.  Read as the total: the default ``base=58`` (widths 58, 88, 130, 196, 294) gives
  4.26 M parameters for the cascade (2.13 M per RAIU-Net) and 30.5 GFLOPs at 256x256
  (FlopCounterMode, FFTs not counted); the per-net reading would need ``base`` of about 84.  The
  shipped variant (``base=16``) has 0.37 M parameters, 3.15 GFLOPs.  See :data:`SIZES`.
* CPU cost: the design has many cheap, memory-bound ops on wide maps (about 350 convolutions and
  44 FFT low-pass / spectral pooling calls per forward pass of the cascade), so on CPU its speed
  is bound by memory traffic and per-op overhead rather than by FLOPs; see below.
* Recipe: the summary gives 256x256 slices and the loss; optimizer and schedule are not given:
  Adam, lr 1e-3, poly decay, batch 8, 100 epochs (the U-Net baseline's recipe, for comparability).
  Preprocessing: HU window [-1250, 250] scaled to [0, 1], slices resized to 256x256.

CPU implementation (same function, same layers, same ``state_dict``)
--------------------------------------------------------------------
The readings above fix what the network computes; how it is computed was reworked for CPU speed
(issue 13: the plain formulation ran at ~3 % of the CPU's convolution peak).  Every step computes
the same function (float rounding aside) with the same layers, so checkpoints written before load
and predict as before; ``tests/test_chs_net_equivalence.py`` checks outputs, gradients and
BatchNorm statistics against a frozen copy of the plain formulation (``tests/chs_net_reference.py``).

* Spectral pooling and the spectral low-pass use real FFTs with cached masks / indices instead
  of ``fft2`` + ``fftshift`` + crop; the low-pass's backward is the low-pass itself (a symmetric
  linear map).  See :mod:`.spectral_pooling`.
* The feature maps are channels-last (:mod:`.fast_layers`): oneDNN's depthwise convolutions,
  the 3x3 stride-1 max pool and BatchNorm are several times faster on them; 1x1 convolutions
  run as ``F.linear`` on the NHWC view.
* The four inception branches' BatchNorms and ReLUs run as one call each on the concatenation
  (:mod:`.joint_batch_norm`; BatchNorm is per channel).
* Hybrid pooling: the 1x1 conv of ``cat(max pool, spectral part)`` runs part by part (no
  concatenation); in the inception branch the low-pass runs after its part's 1x1 conv, which has
  4-8x fewer channels (both linear, and the low-pass treats every channel alike, so they
  commute), and that 1x1 conv runs in one matrix product with the 1x1 branch (same input).
* The 5x5 depthwise convolutions take their weight gradient from one forward depthwise
  convolution per image (:class:`.fast_layers.DepthwiseConv2d`); oneDNN's own falls back to a
  generic grouped kernel for 5x5.
* Where ONNX Runtime is installed the network runs there (its measured setting): PyTorch's
  exporter writes no real FFT, so while it traces, the spectral maps are matrix products
  (:mod:`.spectral_matrices`), the 1x1 convolutions plain convolutions (which ONNX Runtime fuses
  with their BatchNorm and ReLU) and the running maxima one max pool.  Same logits to float
  rounding, checked against PyTorch at export; the graph holds its input size, so it is exported
  per size (``onnx_graph_per_size``).
* Tried and left out, no measurable gain: a 3x3 stride-1 max pool as 1x3 then 3x1 (exact, but
  slower in both layouts; channels-last makes PyTorch's own 3x3 kernel ~4x faster), one depthwise
  convolution for the 3x3 and 5x5 branches (5x5 kernels, 2 outputs per group: oneDNN runs it
  3-5x slower than the two), block-diagonal or dense composed convolutions for the branches, and
  a depthwise input gradient computed as a forward convolution.

Measured with ``benchmarks/chs_net_speed.py`` (``benchmarks/results/chs_net_speed.md`` has the
details): shipped variant (``base=16``), batch 4, one thread, ``OMP_WAIT_POLICY=PASSIVE``, ms per
sample, process CPU time, fastest of 5 runs, mean of two alternating before/after rounds, on a
2-core machine that four other trainings kept at load 5-7 (so memory-bound code is slowed more):

=========  ==============================  ==============================
size       forward: before -> after        training step: before -> after
=========  ==============================  ==============================
256x256    1430 -> 392   (3.6x)            2543 -> 1074   (2.4x)
160x160     367 -> 112   (3.3x)             854 ->  323   (2.6x)
=========  ==============================  ==============================
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..preprocessing import Preprocessing
from .fast_layers import DepthwiseConv2d, PointwiseConv2d, cat_channels, pointwise_conv
from .joint_batch_norm import joint_batch_norm
from .losses import BCEDiceLoss
from .registry import NetworkSpec, Recipe, register
from .spectral_pooling import HybridPool2d, HybridPoolBranch2d, global_spectral_pool2d
from .unet import crop_to, pad_to_multiple

# measured with torch.utils.flop_counter.FlopCounterMode on a (1, 1, 256, 256) input (FFT flops are
# not counted by the flop counter; they are a small fraction: O(HW log HW) per channel)
# (re-measure with: model on the "meta" device, one forward under FlopCounterMode)
SIZES = {
    "default (base=58)": {"params_M": 4.257, "GFLOPs_256": 30.51},
    "shipped (base=16)": {"params_M": 0.367, "GFLOPs_256": 3.15},
}


class SeparableConvBN(nn.Sequential):
    """Depthwise kxk (groups = in) + pointwise 1x1, then BN (and ReLU unless ``relu=False``)."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool = True):
        layers: List[nn.Module] = []
        if k > 1:
            layers.append(DepthwiseConv2d(cin, k))
        layers += [PointwiseConv2d(cin, cout, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.n_convs = 2 if k > 1 else 1

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutions only (depthwise and pointwise), without BN and ReLU."""
        for conv in list(self)[: self.n_convs]:
            x = conv(x)
        return x

    @property
    def norm(self) -> nn.BatchNorm2d:
        return self[self.n_convs]


class InceptionConv(nn.Module):
    """Separable 1x1, 3x3, 5x5 and stride-1 hybrid pooling in parallel (each BN+ReLU), concat, 1x1 Conv-BN-ReLU.

    The four branches' BatchNorms and ReLUs run as one call each on the concatenation (exact:
    BatchNorm is per channel, see :mod:`.joint_batch_norm`); the layers stay one per branch.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        branch = max(4, cout // 4)
        self.branches = nn.ModuleList([SeparableConvBN(cin, branch, k) for k in (1, 3, 5)])
        self.pool_branch = nn.Sequential(HybridPoolBranch2d(cin, branch), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        self.merge = nn.Sequential(
            PointwiseConv2d(4 * branch, cout, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, pooled = self._one_by_one_and_pool(x)
        convolved = cat_channels([first, self.branches[1].convolve(x), self.branches[2].convolve(x), pooled])
        norms = [b.norm for b in self.branches] + [self.pool_branch[1]]
        return self.merge(F.relu(joint_batch_norm(convolved, norms), inplace=True))

    def _one_by_one_and_pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 1x1 branch and the pooling branch, before BN.

        When the pooling branch low-passes after a 1x1 conv of ``x`` (see
        :class:`HybridPoolBranch2d`), that conv and the 1x1 branch read the same ``x`` and run as
        one matrix product with the two weights stacked: ``x`` is read once, and its gradient is
        written once instead of twice and summed.
        """
        one_by_one, pool = self.branches[0], self.pool_branch[0]
        if not pool.lowpass_after_projection():
            return one_by_one.convolve(x), pool(x)
        weights = torch.cat([one_by_one[0].weight, pool.projection_weight()])
        first, projected = pointwise_conv(x, weights).split(one_by_one[0].out_channels, dim=1)
        return first, pool(x, projected)


class ResidualInceptionBlock(nn.Module):
    """Two inception convs plus a separable 3x3 Conv-BN shortcut, added, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(InceptionConv(cin, cout), InceptionConv(cout, cout))
        self.shortcut = SeparableConvBN(cin, cout, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.body(x) + self.shortcut(x))


class SpectralSpatialDepthAttention(nn.Module):
    """SSD attention on a skip ``x`` (C channels, size 2s) gated by decoder features ``g`` (size s)."""

    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        hidden = max(1, skip_channels // 2)
        self.depth = nn.Sequential(
            nn.Conv2d(skip_channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, skip_channels, 1), nn.Sigmoid(),
        )
        self.theta = nn.Conv2d(skip_channels, hidden, 2, stride=2, bias=False)
        self.phi = PointwiseConv2d(gate_channels, hidden)
        self.psi = PointwiseConv2d(hidden, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x = x * self.depth(global_spectral_pool2d(x))
        a = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * a


def stage_widths(base: int, depth: int, growth: float = 1.5) -> List[int]:
    """``base * growth**level`` rounded to an even number of channels."""
    return [max(2, 2 * int(round(base * growth**i / 2))) for i in range(depth + 1)]


class RAIUNet(nn.Module):
    """Residual attention inception U-Net with hybrid pooling; returns raw logits ``(B, out, H, W)``.

    Input sizes must be multiples of ``2**depth`` (the cascade pads).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 58, depth: int = 4,
                 growth: float = 1.5):
        super().__init__()
        widths = stage_widths(base, depth, growth)
        self.depth = depth
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                self.pools.append(HybridPool2d(cin))
            self.encoders.append(ResidualInceptionBlock(cin, w))
            cin = w
        self.ups = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_low, w_high in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.attentions.append(SpectralSpatialDepthAttention(w_high, w_low))
            self.ups.append(nn.ConvTranspose2d(w_low, w_high, 2, stride=2))
            self.decoders.append(ResidualInceptionBlock(2 * w_high, w_high))
        self.head = PointwiseConv2d(widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # the maps stay channels-last (see fast_layers)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        x = skips.pop()
        for att, up, dec in zip(self.attentions, self.ups, self.decoders):
            skip = att(skips.pop(), x)
            x = dec(cat_channels([up(x), skip]))
        return self.head(x)


class CHSNet(nn.Module):
    """Lung RAIU-Net, then infection RAIU-Net on ``cat(ct, lung probability)``; logits (B, 2, H, W)."""

    #: its ONNX graph writes the spectral maps as matrix products of one size (:mod:`.spectral_matrices`)
    onnx_graph_per_size = True

    def __init__(self, in_channels: int = 1, base: int = 58, depth: int = 4, growth: float = 1.5,
                 restrict_to_lung: bool = True, detach_lung_map: bool = True):
        super().__init__()
        self.depth = depth
        self.restrict_to_lung = restrict_to_lung
        self.detach_lung_map = detach_lung_map
        self.lung_net = RAIUNet(in_channels, 1, base, depth, growth)
        self.infection_net = RAIUNet(in_channels + 1, 1, base, depth, growth)

    def forward(self, x: torch.Tensor) -> dict:
        x, crop = pad_to_multiple(x, 2**self.depth)
        lung_logits = self.lung_net(x)
        lung_map = torch.sigmoid(lung_logits)
        if self.detach_lung_map:
            lung_map = lung_map.detach()
        infection_raw = self.infection_net(torch.cat([x, lung_map], dim=1))
        infection = infection_raw
        if self.restrict_to_lung and not self.training:
            infection = torch.minimum(infection_raw, lung_logits)
        return {  # contiguous, whatever layout the nets ran in
            "logits": crop_to(torch.cat([lung_logits, infection], dim=1), crop).contiguous(),
            "infection_raw_logits": crop_to(infection_raw, crop).contiguous(),
        }


class CHSNetLoss(BCEDiceLoss):
    """``bce_weight * BCE + dice_weight * soft Dice`` on both channels (paper: 0.5 and 0.5)."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5):
        super().__init__(bce_weight, dice_weight)


SPEC = register(
    NetworkSpec(
        name="chs_net",
        title="CHS-Net (cascaded RAIU-Nets)",
        build=CHSNet,
        dims=2,
        loss=CHSNetLoss,
        preprocessing=Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="minmax", inplane_size=(256, 256)),
        recipe=Recipe(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="poly", epochs=100, batch_size=8,
                      input_size=(256, 256), augmentation=("flip", "rotate", "scale"),
                      extra={"loss_weights": {"bce": 0.5, "dice": 0.5}}),
        default_kwargs={"base": 58},
        shipped_kwargs={"base": 16},
        paper="Punn, Agarwal. CHS-Net: a deep learning approach for hierarchical segmentation of COVID-19 "
              "via CT images. Neural Processing Letters 2022 (arXiv 2012.07079)",
        stride=16,
    )
)
