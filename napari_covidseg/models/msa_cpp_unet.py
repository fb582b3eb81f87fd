"""Multi-scale attention U-Net with class-probability-preserving pooling (Yang, Chen), SEEDS.md section 2.

What the network does and why
-----------------------------
A U-Net whose encoder convolutions are replaced by multi-scale attention modules: depthwise strip
convolutions of three lengths (SegNeXt's MSCA) see elongated structures (vessels, fissures,
subpleural bands) at several scales for little cost, and CBAM then re-weights channels and
positions.  Down-sampling is a learned stride-2 convolution rather than max pooling.  Each
down-sampled map also feeds an auxiliary classifier trained against the ground truth reduced by
class-probability-preserving (CPP) pooling (:mod:`.cpp_pooling`), which pushes the coarse
encoder features to already know how much lung and infection each cell holds.

Readings chosen where the paper is ambiguous (all configurable through the constructor / loss)
------------------------------------------------------------------------------------------------
* Layout: a 3x3 Conv-BN-ReLU stem (1 -> ``base``), then 4 encoder stages; stage i holds two
  multi-scale attention modules at width ``base * 2**(i-1)`` and ends with a stride-2 3x3
  Conv-BN-ReLU that doubles the width (the paper's "strided convolution instead of max pooling").
  The stage output before the down-sampling is the skip; the bottleneck (1/16) is two 3x3
  Conv-BN-ReLU; the decoder is U-Net's (2x2 transposed conv, concatenation, two 3x3 CBR), head a
  1x1 conv to 2 channels.  Widths ``base * (1, 2, 4, 8, 16)``, default ``base=32`` (the paper
  gives no widths or parameter count): 13.13 M parameters, 30.2 GFLOPs at 1x1x256x256 while
  training (with the auxiliary heads), 25.3 at inference (without them), as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per multiply-add).  The shipped
  variant ``base=12``: 1.88 M parameters, 4.66 GFLOPs training, 3.98 inference.
* Multi-scale attention module (SegNeXt block + CBAM): ``u = GELU(1x1(BN(x)))``;
  ``a = dw5x5(u)``; ``a = 1x1(a + sum_k dw_kx1(dw_1xk(a)))`` with k = 7, 11, 21;
  ``f = 1x1(a * u)``; ``out = x + CBAM(f)``.  CBAM: channel attention = sigmoid(MLP(avgpool) +
  MLP(maxpool)) with a shared 2-layer MLP, reduction 16 (CBAM's value, at least 4 hidden units);
  then spatial attention = sigmoid(7x7 conv([mean_c, max_c])).
* Auxiliary heads read the output of each of the 4 down-sampling convolutions (1/2, 1/4, 1/8,
  1/16): 3x3 conv (same width), BN, ReLU, 1x1 conv to 3 classes, softmax.
* Classes of the auxiliary softmax: our task is multi-label (infection lies inside the lung), so
  the softmax runs over 3 mutually exclusive classes {background, lung without infection,
  infection} (:func:`.cpp_pooling.exclusive_classes`).
* CPP target: the 3-class one-hot ground truth average-pooled in s x s cells (s = 2, 4, 8, 16);
  sizes not divisible by s give partial last cells whose fractions count real pixels only.  The
  network pads its input at the bottom/right (not centred) so its coarse cells line up with the
  target's cells, and crops the aux maps to ``ceil(H/s) x ceil(W/s)``.
* Auxiliary loss: KL(target || prediction) = sum_c t_c log(t_c / p_c), summed over classes,
  averaged over cells and batch; total = BCE(main logits) + ``lambda_cpp`` * sum over the 4
  scales, ``lambda_cpp`` = 1 (the paper adds the terms unweighted).
* Recipe: RMSProp, lr 1e-3, weight decay 1e-4, 70 epochs, 256x256.  The paper gives no batch size
  (8 chosen, like the other papers) and no learning-rate schedule (constant chosen).
* ``forward`` returns ``"aux"`` (probabilities, a list from 1/2 to 1/16) and ``"aux_logits"``
  (what the loss uses, for a numerically stable log-softmax) while training, or when called with
  ``aux=True``.  In eval mode it skips the auxiliary heads by default: nothing at inference reads
  them, and they cost 15 % of the shipped network's FLOPs (0.68 of 4.66 GFLOPs at 256 x 256); the
  logits do not depend on them.

Export form (ONNX Runtime, the CPU inference path; same values up to float rounding, tested)
---------------------------------------------------------------------------------------------
Four steps are written differently while ``torch.onnx.export`` traces the network, because
ONNX Runtime runs the plain forms slowly (profiled at 1 x 1 x 256 x 256): the mean and max over
channels by combining halves of the channels (ReduceMean / ReduceMax over the channel axis ran at
~1 GB/s); CBAM's 2 -> 1-channel 7x7 convolution as a 1x7 convolution to 7 row maps summed after
shifting (:func:`conv_by_rows`; as one convolution, ONNX Runtime pads its channels to its 16-wide
blocks, 256x the work; as two depthwise maps it unfolds every 7x7 window: 1.0 ms at full
resolution, against 0.7 in rows); each module's BatchNorm folded into the 1x1 convolution after
it; the decoder's convolution of [up-sampled, skip] as two convolutions added
(:func:`.unet.decode_level`).  In every form, the module adds its strips onto ``a`` one by one
(``a + s_7 + s_11 + s_21``), so that ONNX Runtime fuses each addition into a strip's last
convolution.  The row form, the decoder's two convolutions and this order together: 72.9 -> 67.2
ms a forward (minimum of 90 interleaved runs, 1 thread; first quartile 76.1 -> 71.4).

And the shipped variant's full-resolution width (12: stem, first stage, last decoder level) is
zero-padded to 16 in the network ONNX Runtime runs (:meth:`MSACPPUNet.export_form`,
:mod:`.channel_padding`): ONNX Runtime's convolutions work on blocks of 16 channels (AVX-512; 8
with AVX2, where 12 is padded to 16 as well) and reordered the 12-channel tensors between
layouts around every depthwise convolution.  The extra channels stay exactly zero; CBAM's
channel mean and max read the real channels only.  Measured (1 thread, 1 x 1 x 256 x 256,
interleaved): 0.080 -> 0.077 s a forward, although the padded layers do a third more work.
Padding the 24-wide stage to 32 as well was slower.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..preprocessing import Preprocessing
from .channel_padding import onnx_channel_block, padded_batch_norm, padded_conv, padded_transposed_conv, spread
from .cpp_pooling import cpp_pool, exclusive_classes, kl_to_prediction
from .losses import bce_loss, full_weight
from .registry import NetworkSpec, Recipe, register
from .unet import conv_bn_relu, decode_level, folds_for_export, unet_decoder

AUX_STRIDES = (2, 4, 8, 16)
AUX_CLASS_NAMES = ("background", "lung without infection", "infection")


def _halving(x: torch.Tensor, combine) -> torch.Tensor:
    """``x`` (B, C, H, W) reduced over its channels to (B, 1, H, W) by combining its two halves
    until one plane is left (an odd one out joins the next round): log2(C) large elementwise
    steps, where ONNX Runtime reduces over the channel axis slowly."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        combined = combine(x[:, :half], x[:, half:2 * half])
        x = torch.cat([combined, x[:, 2 * half:]], dim=1) if x.shape[1] % 2 else combined
    return x


def conv_by_rows(maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(maps, weight, bias)`` with "same" zero padding, for one output map (weight
    (1, C, k, k), k odd), computed as a (1 x k) convolution to k row maps (one per kernel row) whose
    shifted copies are summed.  ONNX Runtime's convolution of a few maps unfolds every k x k window
    (49 values per pixel and map for CBAM's 7 x 7); this form unfolds k."""
    k = weight.shape[-1]
    h = maps.shape[2]
    rows = F.conv2d(F.pad(maps, (k // 2,) * 4), weight[0].transpose(0, 1).unsqueeze(2))  # (B, k, H + k - 1, W)
    out = rows[:, :1, :h]
    for dy in range(1, k):
        out = out + rows[:, dy:dy + 1, dy:dy + h]
    return out + bias.view(1, 1, 1, 1)


class CBAM(nn.Module):
    """Convolutional block attention: channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.used = channels  # the first ``used`` channels are real; the others zero padding (export form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        x = x * channel
        if torch.onnx.is_in_onnx_export():  # the export form (module docstring); the padding adds 0 to the sum
            maps = torch.cat([_halving(x, torch.add) / self.used, _halving(x[:, :self.used], torch.maximum)], dim=1)
            return x * torch.sigmoid(conv_by_rows(maps, self.spatial.weight, self.spatial.bias))
        real = x[:, :self.used]
        maps = torch.cat([real.mean(dim=1, keepdim=True), real.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))

    def padded(self, index: torch.Tensor, width: int) -> "CBAM":
        """A copy on ``width`` channels, this one's at ``index`` (:mod:`.channel_padding`)."""
        wide = copy.deepcopy(self)
        hidden = self.mlp[0].out_channels
        wide.mlp[0] = padded_conv(self.mlp[0], torch.arange(hidden), hidden, index, width)
        wide.mlp[2] = padded_conv(self.mlp[2], index, width, torch.arange(hidden), hidden)
        return wide


class MultiScaleAttention(nn.Module):
    """SegNeXt MSCA (5x5 depthwise + 1xk/kx1 depthwise strips) followed by CBAM, with a residual."""

    def __init__(self, channels: int, strip_sizes=(7, 11, 21), reduction: int = 16):
        super().__init__()
        c = channels
        self.norm = nn.BatchNorm2d(c)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.local = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.strips = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, (1, k), padding=(0, k // 2), groups=c),
                          nn.Conv2d(c, c, (k, 1), padding=(k // 2, 0), groups=c))
            for k in strip_sizes
        ])
        self.mix = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.cbam = CBAM(c, reduction)

    def normed_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``proj_in(norm(x))``; in the export form (eval mode) one 1x1 convolution with the
        BatchNorm folded in: ``W (s x + t) + b = (W s) x + (W t + b)``."""
        if not folds_for_export(self.norm):
            return self.proj_in(self.norm(x))
        scale = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        shift = self.norm.bias - self.norm.running_mean * scale
        weight = self.proj_in.weight
        return F.conv2d(x, weight * scale.view(1, -1, 1, 1), self.proj_in.bias + weight[:, :, 0, 0] @ shift)

    def padded(self, width: int) -> "MultiScaleAttention":
        """A copy on ``width`` channels whose first ones are this module's and the rest zero padding
        (zero in, zero out: every weight, bias and BatchNorm parameter of theirs is 0)."""
        c = self.proj_in.in_channels
        index = spread(c, width)
        wide = copy.deepcopy(self)
        wide.norm = padded_batch_norm(self.norm, index, width)
        for name in ("proj_in", "local", "mix", "proj_out"):
            setattr(wide, name, padded_conv(getattr(self, name), index, width, index, width))
        for wide_strip, strip in zip(wide.strips, self.strips):
            for i, conv in enumerate(strip):
                wide_strip[i] = padded_conv(conv, index, width, index, width)
        wide.cbam = self.cbam.padded(index, width)
        return wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.gelu(self.normed_projection(x))
        a = self.local(u)
        total = a  # a + strip_7(a) + strip_11(a) + strip_21(a), each addition onto a strip's last convolution
        for strip in self.strips:  # (ONNX Runtime fuses such an addition into the convolution)
            total = total + strip(a)
        return x + self.cbam(self.proj_out(self.mix(total) * u))


def strided_down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _padded_cbr(block: nn.Sequential, out_index, out_width: int, in_index, in_width: int) -> nn.Sequential:
    """A Conv-BN-ReLU block (:func:`.unet.conv_bn_relu`) widened by :mod:`.channel_padding`."""
    conv, norm, relu = block
    return nn.Sequential(padded_conv(conv, out_index, out_width, in_index, in_width),
                         padded_batch_norm(norm, out_index, out_width), relu)


def aux_head(channels: int, n_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, n_classes, 1))


def pad_bottom_right(x: torch.Tensor, multiple: int):
    """Pad H and W at the bottom/right to a multiple, so coarse cells stay aligned with the top-left."""
    h, w = x.shape[2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class MSACPPUNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 32,
                 strip_sizes=(7, 11, 21), modules_per_stage: int = 2, n_aux_classes: int = 3):
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        self.stem = conv_bn_relu(in_channels, widths[0])
        self.stages = nn.ModuleList([
            nn.Sequential(*[MultiScaleAttention(w, strip_sizes) for _ in range(modules_per_stage)]) for w in widths[:4]
        ])
        self.downs = nn.ModuleList([strided_down(a, b) for a, b in zip(widths[:4], widths[1:])])
        self.aux_heads = nn.ModuleList([aux_head(w, n_aux_classes) for w in widths[1:]])
        self.bottleneck = nn.Sequential(conv_bn_relu(widths[4], widths[4]), conv_bn_relu(widths[4], widths[4]))
        self.ups, self.decoders = unet_decoder(widths)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor, aux: Optional[bool] = None) -> dict:
        """Logits, plus the auxiliary maps when ``aux`` (default: while training)."""
        aux = self.training if aux is None else aux
        h, w = x.shape[2:]
        x = self.stem(pad_bottom_right(x, AUX_STRIDES[-1]))
        skips, aux_logits = [], []
        for stage, down, head, s in zip(self.stages, self.downs, self.aux_heads, AUX_STRIDES):
            x = stage(x)
            skips.append(x)
            x = down(x)
            if aux:
                aux_logits.append(head(x)[:, :, : -(-h // s), : -(-w // s)])
        x = self.bottleneck(x)
        for up, dec in zip(self.ups, self.decoders):
            x = decode_level(dec, up(x), skips.pop())
        logits = self.head(x)[:, :, :h, :w]
        if not aux:
            return {"logits": logits}
        return {"logits": logits, "aux_logits": aux_logits, "aux": [torch.softmax(a, dim=1) for a in aux_logits]}

    @torch.no_grad()
    def export_form(self, block: Optional[int] = None) -> "MSACPPUNet":
        """The network ONNX Runtime runs: this one, or (in eval mode) a copy whose full-resolution
        width (stem, first stage, last decoder level) is zero-padded up to a multiple of ``block``
        (default: ONNX Runtime's channel block on this CPU; module docstring); the same logits."""
        block = block or onnx_channel_block()
        c = self.head.in_channels
        width = -(-c // block) * block
        if width == c or self.training:
            return self
        index, wide = spread(c, width), copy.deepcopy(self)
        stem_in = torch.arange(self.stem[0].in_channels)
        wide.stem = _padded_cbr(self.stem, index, width, stem_in, len(stem_in))
        wide.stages[0] = nn.Sequential(*[module.padded(width) for module in self.stages[0]])
        down, up = self.downs[0][0], self.ups[-1]
        wide.downs[0][0] = padded_conv(down, torch.arange(down.out_channels), down.out_channels, index, width)
        wide.ups[-1] = padded_transposed_conv(up, index, width, torch.arange(up.in_channels), up.in_channels)
        first, second = self.decoders[-1]  # its input: [up-sampled, skip], both padded
        wide.decoders[-1] = nn.Sequential(_padded_cbr(first, index, width, torch.cat([index, width + index]), 2 * width),
                                          _padded_cbr(second, index, width, index, width))
        n_out = self.head.out_channels
        wide.head = padded_conv(self.head, torch.arange(n_out), n_out, index, width)
        return wide


class BCECPPLoss(nn.Module):
    """BCE on the main logits + ``lambda_cpp`` * sum over scales of KL(CPP target || aux softmax)."""

    def __init__(self, lambda_cpp: float = 1.0, strides=AUX_STRIDES):
        super().__init__()
        self.lambda_cpp, self.strides = lambda_cpp, tuple(strides)

    def forward(self, outputs: dict, target: torch.Tensor, progress: float = 0.0, weight=None):
        bce = bce_loss(outputs["logits"], target, weight)
        classes = exclusive_classes(target)
        # the 3 exclusive classes need both labels: a pixel counts only where lung and infection are known
        both_known = None if weight is None else full_weight(weight, target).prod(dim=1, keepdim=True)
        if "aux_logits" in outputs:
            log_probs = [F.log_softmax(a, dim=1) for a in outputs["aux_logits"]]
        else:
            log_probs = [torch.log(p.clamp_min(1e-12)) for p in outputs["aux"]]
        if len(log_probs) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} auxiliary maps, got {len(log_probs)}")
        terms = {}
        cpp_total = bce.new_zeros(())
        for s, log_p in zip(self.strides, log_probs):
            t = cpp_pool(classes, s)
            if t.shape != log_p.shape:
                raise ValueError(f"auxiliary map at 1/{s} has shape {tuple(log_p.shape)}, CPP target {tuple(t.shape)}")
            kl = kl_to_prediction(t, log_p, None if both_known is None else cpp_pool(both_known, s))
            terms[f"cpp_{s}"] = float(kl.detach())
            cpp_total = cpp_total + kl
        total = bce + self.lambda_cpp * cpp_total
        return total, {"bce": float(bce.detach()), **terms}


SPEC = register(
    NetworkSpec(
        name="msa_cpp_unet",
        title="MSA-CPP U-Net (multi-scale attention, CPP pooling)",
        build=MSACPPUNet,
        dims=2,
        loss=BCECPPLoss,
        preprocessing=Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="minmax", inplane_size=(256, 256)),
        recipe=Recipe(optimizer="rmsprop", lr=1e-3, weight_decay=1e-4, schedule="constant", epochs=70, batch_size=8,
                      input_size=(256, 256), augmentation=("flip", "rotate")),
        default_kwargs={"base": 32},
        shipped_kwargs={"base": 12},
        paper="Yang, Chen. Multi-scale attention U-Net with class-probability-preserving pooling for COVID-19 "
              "lung infection segmentation (MSCA after SegNeXt, Guo et al. 2022; CBAM, Woo et al. 2018)",
        stride=16,
    )
)
