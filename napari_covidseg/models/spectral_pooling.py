"""Spectral pooling and hybrid pooling (pure torch), the down-sampling of CHS-Net's RAIU-Net.

Why spectral pooling
--------------------
Max pooling keeps the strongest local response but aliases and throws away 3/4 of the signal.
Spectral pooling (Rippel, Snoek, Adams, NeurIPS 2015) halves a feature map by keeping only the
central, low-frequency quarter of its 2D spectrum: the result is the best low-pass approximation
of the map at the lower resolution, with no aliasing.  CHS-Net runs both in parallel ("hybrid
pooling") and lets a 1x1 convolution choose, per channel, how to mix them.

Scaling
-------
Both the forward and the inverse FFT use ``norm="forward"`` (the forward transform divides by the
number of pixels, the inverse does not), so the DC coefficient is the mean and the inverse
transform of the cropped spectrum at the smaller size has the same mean as the input: intensities
are kept, not multiplied by the area ratio.

Readings chosen (CHS-Net's text is short on these)
--------------------------------------------------
* Crop: ``fftshift``, keep the ``out_h x out_w`` block centred on the DC term, ``ifftshift``,
  inverse FFT, real part.  For even output sizes the most negative frequency of the crop has no
  positive partner; taking the real part of the inverse is what makes the result real (the
  imaginary residue is dropped), as in Rippel et al.'s reference implementation.
* The hybrid pooling *branch* inside the inception convolution works at stride 1, where a
  spectral "pooling" to the same size would be the identity.  Its stride-1 analogue here is
  :func:`spectral_lowpass2d`: the same spectrum crop, but zero-padded back to the full size (an
  ideal low-pass filter keeping the central ``keep`` fraction of the frequencies per axis), just
  as a 3x3 stride-1 max pool is the stride-1 analogue of 2x2 max pooling.
* Global spectral pooling to ``1 x 1 x C`` keeps only the DC term of each channel's spectrum,
  which with this scaling is exactly the spatial mean; :func:`global_spectral_pool2d` computes it
  as the mean (identical value, no FFT), which the tests check against the FFT's DC term.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _centre_slice(n: int, m: int) -> slice:
    """Indices of the ``m`` frequencies around DC in an fftshift-ed axis of length ``n``."""
    start = n // 2 - m // 2
    return slice(start, start + m)


def _crop_spectrum(x: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
    """Centred (fftshift-ed) spectrum of the last two dims, cropped to ``out_size``; mean = DC."""
    h, w = x.shape[-2:]
    oh, ow = out_size
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    return spectrum[..., _centre_slice(h, oh), _centre_slice(w, ow)]


def spectral_pool2d(x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``out_size`` (default: half, rounded down) in the frequency domain.

    Keeps the mean of every channel; a map whose spectrum lies inside the kept band is resampled
    exactly (band-limited interpolation), higher frequencies are removed instead of aliased.
    """
    h, w = x.shape[-2:]
    if out_size is None:
        out_size = (max(1, h // 2), max(1, w // 2))
    oh, ow = int(out_size[0]), int(out_size[1])
    if not (1 <= oh <= h and 1 <= ow <= w):
        raise ValueError(f"spectral pooling can only shrink: input {h}x{w}, asked for {oh}x{ow}")
    cropped = _crop_spectrum(x, (oh, ow))
    out = torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1)), norm="forward").real
    return out.to(x.dtype)


def spectral_lowpass2d(x: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    """Ideal low-pass filter of the last two dims keeping the central ``keep`` fraction of frequencies per axis.

    The stride-1 counterpart of :func:`spectral_pool2d` (same band, same size as the input).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], not {keep}")
    h, w = x.shape[-2:]
    oh, ow = max(1, int(round(h * keep))), max(1, int(round(w * keep)))
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    mask = torch.zeros((h, w), dtype=torch.bool, device=x.device)
    mask[_centre_slice(h, oh), _centre_slice(w, ow)] = True
    spectrum = spectrum * mask
    out = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward").real
    return out.to(x.dtype)


def global_spectral_pool2d(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, 1, 1)``: the DC term of each channel's spectrum, i.e. its mean."""
    return x.mean(dim=(-2, -1), keepdim=True)


class HybridPool2d(nn.Module):
    """Down-sampling by 2: max pooling and spectral pooling in parallel, concatenated, 1x1 Conv-BN-ReLU.

    The 1x1 convolution maps the ``2 * channels`` concatenation to ``out_channels`` (default: the
    input width), so the network learns per channel how much of the sharp (max) and of the
    smooth, alias-free (spectral) summary to keep.
    """

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        self.merge = nn.Sequential(
            nn.Conv2d(2 * channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([F.max_pool2d(x, 2), spectral_pool2d(x)], dim=1))


class HybridPoolBranch2d(nn.Module):
    """Stride-1 hybrid pooling for the inception branch: 3x3 max pool and spectral low-pass in parallel, 1x1 conv.

    BatchNorm and ReLU follow in the inception block, like every other branch.
    """

    def __init__(self, in_channels: int, out_channels: int, keep: float = 0.5):
        super().__init__()
        self.keep = keep
        self.merge = nn.Conv2d(2 * in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        return self.merge(torch.cat([pooled, spectral_lowpass2d(x, self.keep)], dim=1))
