"""Frozen reference: CHS-Net and its spectral pooling as they were computed before the CPU speed-up.

A copy of ``napari_covidseg/models/chs_net.py`` and ``spectral_pooling.py`` at commit d5c16ed
(docstrings shortened; the FFTs keep float64 input in float64, see ``_fft_input``), kept only
so that ``test_chs_net_equivalence.py`` can check that the
faster formulation computes the same outputs and gradients from the same ``state_dict``.  Do not
optimise this file: its value is that it is the plain, slow formulation of the paper readings
(complex FFT, ``fftshift``, centre crop, ``ifftshift``, inverse FFT, real part; a 3x3 stride-1
max pool; one convolution per branch).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_covidseg.models.unet import crop_to, pad_to_multiple


def _fft_input(x: torch.Tensor) -> torch.Tensor:
    # the one change to the frozen code: float64 input stays float64 (was: always float32), as in
    # the fast code, so that the two can be compared in float64 (see test_chs_net_equivalence.py)
    return x if x.dtype == torch.float64 else x.float()


def _centre_slice(n: int, m: int) -> slice:
    start = n // 2 - m // 2
    return slice(start, start + m)


def _crop_spectrum(x: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    oh, ow = out_size
    spectrum = torch.fft.fftshift(torch.fft.fft2(_fft_input(x), norm="forward"), dim=(-2, -1))
    return spectrum[..., _centre_slice(h, oh), _centre_slice(w, ow)]


def spectral_pool2d(x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    h, w = x.shape[-2:]
    if out_size is None:
        out_size = (max(1, h // 2), max(1, w // 2))
    oh, ow = int(out_size[0]), int(out_size[1])
    cropped = _crop_spectrum(x, (oh, ow))
    out = torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1)), norm="forward").real
    return out.to(x.dtype)


def spectral_lowpass2d(x: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    h, w = x.shape[-2:]
    oh, ow = max(1, int(round(h * keep))), max(1, int(round(w * keep)))
    spectrum = torch.fft.fftshift(torch.fft.fft2(_fft_input(x), norm="forward"), dim=(-2, -1))
    mask = torch.zeros((h, w), dtype=torch.bool, device=x.device)
    mask[_centre_slice(h, oh), _centre_slice(w, ow)] = True
    spectrum = spectrum * mask
    out = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward").real
    return out.to(x.dtype)


class HybridPool2d(nn.Module):
    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        self.merge = nn.Sequential(
            nn.Conv2d(2 * channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([F.max_pool2d(x, 2), spectral_pool2d(x)], dim=1))


class HybridPoolBranch2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, keep: float = 0.5):
        super().__init__()
        self.keep = keep
        self.merge = nn.Conv2d(2 * in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        return self.merge(torch.cat([pooled, spectral_lowpass2d(x, self.keep)], dim=1))


class SeparableConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, relu: bool = True):
        layers: List[nn.Module] = []
        if k > 1:
            layers.append(nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False))
        layers += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InceptionConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        branch = max(4, cout // 4)
        self.branches = nn.ModuleList([SeparableConvBN(cin, branch, k) for k in (1, 3, 5)])
        self.pool_branch = nn.Sequential(HybridPoolBranch2d(cin, branch), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        self.merge = nn.Sequential(
            nn.Conv2d(4 * branch, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [b(x) for b in self.branches] + [self.pool_branch(x)]
        return self.merge(torch.cat(parts, dim=1))


class ResidualInceptionBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(InceptionConv(cin, cout), InceptionConv(cout, cout))
        self.shortcut = SeparableConvBN(cin, cout, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SpectralSpatialDepthAttention(nn.Module):
    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        hidden = max(1, skip_channels // 2)
        self.depth = nn.Sequential(
            nn.Conv2d(skip_channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, skip_channels, 1), nn.Sigmoid(),
        )
        self.theta = nn.Conv2d(skip_channels, hidden, 2, stride=2, bias=False)
        self.phi = nn.Conv2d(gate_channels, hidden, 1)
        self.psi = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x = x * self.depth(x.mean(dim=(-2, -1), keepdim=True))
        a = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * a


def stage_widths(base: int, depth: int, growth: float = 1.5) -> List[int]:
    return [max(2, 2 * int(round(base * growth**i / 2))) for i in range(depth + 1)]


class RAIUNet(nn.Module):
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
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        x = skips.pop()
        for att, up, dec in zip(self.attentions, self.ups, self.decoders):
            skip = att(skips.pop(), x)
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class CHSNet(nn.Module):
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
        return {
            "logits": crop_to(torch.cat([lung_logits, infection], dim=1), crop),
            "infection_raw_logits": crop_to(infection_raw, crop),
        }
