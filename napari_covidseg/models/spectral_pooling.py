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

Implementation (same numbers as the readings above, to float rounding)
-----------------------------------------------------------------------
The readings are stated with complex FFTs and ``fftshift``; the code computes the same outputs
with real FFTs of the input (half the spectrum, no shifts):

* Taking the real part of ``ifft(Y)`` equals ``ifft`` of the Hermitian part
  ``(Y(f) + conj(Y(-f))) / 2`` of ``Y``, which ``irfft`` can invert from half the spectrum.
* Low-pass: the Hermitian part of ``X * M`` is ``X * (M(f) + M(-f)) / 2``, a real, cached weight
  table (1/2 on the unpaired edge of an even band).  The filter is then a symmetric linear map, so
  its backward pass is the same filter applied to the gradient, and the FFTs along the rows only
  see the columns the band keeps.
* Spectral pooling: the kept rows and columns are read from ``rfft2`` by cached indices; only
  the output's Nyquist row and column (even output sizes) combine two input frequencies.

In a graph exported for ONNX Runtime, which has no real FFT, both are the same linear maps written
as matrix products (:mod:`.spectral_matrices`).

``tests/test_chs_net_equivalence.py`` checks all of this against a frozen copy of the
complex-FFT code for even and odd sizes, outputs and gradients.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import spectral_matrices
from .fast_layers import PointwiseConv2d, like_layout, pointwise_conv
from .spectral_matrices import kept_frequencies as _kept_frequencies


def _fft_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 for the FFTs (half precision has no CPU FFT), float64 kept as it is."""
    return x if x.dtype == torch.float64 else x.float()


def _with_nyquist_mirrored(freqs: List[int], m: int) -> List[int]:
    """``freqs`` with the unpaired ``-m/2`` (even ``m``) replaced by its partner ``+m/2``."""
    return [-f if m % 2 == 0 and f == -(m // 2) else f for f in freqs]


@functools.lru_cache(maxsize=64)
def _pool_rows(h: int, oh: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices into an ``h``-row spectrum for :func:`spectral_pool2d` to ``oh`` rows (cached).

    ``(kept, kept with -oh/2 -> +oh/2, negated kept)``, each modulo ``h``; see :func:`spectral_pool2d`.
    """
    kept = _kept_frequencies(oh)
    rows = (kept, _with_nyquist_mirrored(kept, oh), [-f for f in kept])
    with torch.inference_mode(False):  # usable by autograd even when first built under inference mode
        return tuple(torch.tensor([f % h for f in r], dtype=torch.long, device=device) for r in rows)


@functools.lru_cache(maxsize=64)
def _lowpass_half_mask(h: int, w: int, oh: int, ow: int, device: torch.device) -> torch.Tensor:
    """Real ``(h, ow // 2 + 1)`` weights that :func:`spectral_lowpass2d` applies to a half spectrum (cached).

    The centre-crop mask ``M = My x Mx`` is not point-symmetric for even band widths (the
    unpaired ``-m/2``), and taking the real part of the inverse FFT of ``X * M`` equals the
    inverse FFT of ``X * (M(f) + M(-f)) / 2``: weight 1 inside the band, 1/2 on its unpaired
    edges (and on the two corners that are the mirror image of each other), 0 outside.  Columns
    above ``ow // 2`` are all zero and left out.
    """
    with torch.inference_mode(False):  # usable by autograd even when first built under inference mode
        my, mx = torch.zeros(h), torch.zeros(w)
        my[[f % h for f in _kept_frequencies(oh)]] = 1.0
        mx[[f % w for f in _kept_frequencies(ow)]] = 1.0
        mask = my[:, None] * mx[None, :]
        mirrored = torch.roll(torch.flip(mask, (0, 1)), (1, 1), (0, 1))  # M(-f): index i -> (-i) mod n
        return ((mask + mirrored) / 2)[:, : ow // 2 + 1].contiguous().to(device)


def spectral_pool2d(x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``out_size`` (default: half, rounded down) in the frequency domain.

    Keeps the mean of every channel; a map whose spectrum lies inside the kept band is resampled
    exactly (band-limited interpolation), higher frequencies are removed instead of aliased.

    Computed with a real FFT (same numbers as the crop described in the module docstring): the
    real part of the inverse FFT of the crop ``Y`` is the inverse FFT of its Hermitian part
    ``(Y(f) + conj(Y(-f))) / 2``, which is ``(X(f) + X(f')) / 2`` with ``f'`` equal to ``f`` except
    that an unpaired ``-o/2`` becomes ``+o/2``.  Both terms are read from the half spectrum of
    ``rfft2``; the output's Nyquist column (even ``ow``) holds ``X(fy, -ow/2) = conj(X(-fy, ow/2))``.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if out_size is None:
        out_size = (max(1, h // 2), max(1, w // 2))
    oh, ow = int(out_size[0]), int(out_size[1])
    if not (1 <= oh <= h and 1 <= ow <= w):
        raise ValueError(f"spectral pooling can only shrink: input {h}x{w}, asked for {oh}x{ow}")
    if torch.onnx.is_in_onnx_export():  # no FFT in the exported graph: the same map as matrix products
        return spectral_matrices.apply(x, "pool", (oh, ow))
    half = torch.fft.rfft2(_fft_input(x), norm="forward")[..., : ow // 2 + 1]
    kept, mirrored, negated = _pool_rows(h, oh, x.device)
    first = half.index_select(-2, kept)
    if ow % 2 == 0:
        nyquist_column = half[..., -1:].index_select(-2, negated).conj()
        first = torch.cat([first[..., :-1], nyquist_column], dim=-1)
    hermitian = (first + half.index_select(-2, mirrored)) * 0.5
    return like_layout(torch.fft.irfft2(hermitian, s=(oh, ow), norm="forward").to(x.dtype), x)


def _apply_half_mask(x: torch.Tensor, half_mask: torch.Tensor) -> torch.Tensor:
    """``irfft2(rfft2(x) * half_mask)`` over the last two dims (``norm="forward"``), at least in float32.

    Done axis by axis so that only the ``half_mask.shape[-1]`` columns that the mask keeps go
    through the FFTs along the rows (the others are zero): the same numbers as the 2D transforms,
    at about half the cost.
    """
    columns = half_mask.shape[-1]
    spectrum = torch.fft.rfft(_fft_input(x), dim=-1, norm="forward")[..., :columns]
    spectrum = torch.fft.fft(spectrum, dim=-2, norm="forward").mul_(half_mask)
    spectrum = torch.fft.ifft(spectrum, dim=-2, norm="forward")
    return like_layout(torch.fft.irfft(spectrum, n=x.shape[-1], dim=-1, norm="forward"), x)


class _SymmetricSpectralFilter(torch.autograd.Function):
    """``irfft2(rfft2(x) * half_mask)`` whose backward is the same filter applied to the gradient.

    With a real weight that is point-symmetric in frequency (``M(f) = M(-f)``) the filter is a
    circular convolution with a real, point-symmetric kernel, i.e. a symmetric linear map, so it is
    its own adjoint.  This backward costs one forward; autograd's own backward of ``rfft2`` builds
    the full complex spectrum and costs about three.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, half_mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(half_mask)
        return _apply_half_mask(x, half_mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (half_mask,) = ctx.saved_tensors
        return _apply_half_mask(grad, half_mask), None


def spectral_lowpass2d(x: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    """Ideal low-pass filter of the last two dims keeping the central ``keep`` fraction of frequencies per axis.

    The stride-1 counterpart of :func:`spectral_pool2d` (same band, same size as the input).
    Computed as ``irfft2(rfft2(x) * weights)`` with the cached weights of :func:`_lowpass_half_mask`.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], not {keep}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = max(1, int(round(h * keep))), max(1, int(round(w * keep)))
    if torch.onnx.is_in_onnx_export():  # no FFT in the exported graph: the same map as matrix products
        return spectral_matrices.apply(x, "lowpass", (oh, ow))
    half_mask = _lowpass_half_mask(h, w, oh, ow, x.device)
    return _SymmetricSpectralFilter.apply(x, half_mask).to(x.dtype)


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
            PointwiseConv2d(2 * channels, out_channels, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge = self.merge[0].forward_parts([F.max_pool2d(x, 2), spectral_pool2d(x)])  # = conv of the concatenation
        return self.merge[2](self.merge[1](merge))


def _running_max3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over each element and its two neighbours along ``dim`` (one at a border)."""
    n = x.shape[dim]
    pairs = torch.maximum(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1))  # max of i and i + 1
    out = torch.empty_like(x)
    torch.maximum(pairs.narrow(dim, 0, n - 2), pairs.narrow(dim, 1, n - 2), out=out.narrow(dim, 1, n - 2))
    out.narrow(dim, 0, 1).copy_(pairs.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(pairs.narrow(dim, n - 2, 1))
    return out


def max_pool3x3_same(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride=1, padding=1)``, exactly.

    Without gradients, as two running maxima of three (along width, then height) on shifted
    views: a max is exact in any order, and PyTorch's CPU kernel for this pool was a quarter of
    CHS-Net's inference time (1.4 ms per call at 256 x 256 x 16 channels).  With gradients the
    PyTorch pool runs, so training routes them to the same arg-max element as before; while
    PyTorch exports a graph, too (one ONNX ``MaxPool``).
    """
    if (torch.is_grad_enabled() and x.requires_grad) or min(x.shape[-2:]) < 2 or torch.onnx.is_in_onnx_export():
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return _running_max3(_running_max3(x, -1), -2)


class HybridPoolBranch2d(nn.Module):
    """Stride-1 hybrid pooling for the inception branch: 3x3 max pool and spectral low-pass in parallel, 1x1 conv.

    BatchNorm and ReLU follow in the inception block, like every other branch.

    The 1x1 conv of the concatenation is computed as one 1x1 conv per part, summed.  The low-pass
    and the 1x1 conv of its part are both linear, and the low-pass treats every channel alike, so
    they commute: the low-pass runs after the 1x1 conv when that has fewer output than input
    channels (in CHS-Net 4 to 8 times fewer), before it otherwise.  Same function, fewer FFTs.
    """

    def __init__(self, in_channels: int, out_channels: int, keep: float = 0.5):
        super().__init__()
        self.keep = keep
        self.merge = PointwiseConv2d(2 * in_channels, out_channels, bias=False)

    def lowpass_after_projection(self) -> bool:
        """Whether the low-pass runs after the 1x1 conv of its part (which then has fewer channels)."""
        return self.merge.out_channels < self.merge.in_channels // 2

    def projection_weight(self) -> torch.Tensor:
        """The 1x1 conv weight of the low-pass part (the second half of the input channels)."""
        return self.merge.weight_parts([self.merge.in_channels // 2] * 2)[1]

    def forward(self, x: torch.Tensor, projected: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``projected``: the low-pass part's 1x1 conv of ``x``, if the caller has computed it already.

        (:class:`~napari_covidseg.models.chs_net.InceptionConv` computes it in one matrix product
        with its 1x1 branch, which reads the same ``x``.)
        """
        weight_max, weight_low = self.merge.weight_parts([x.shape[1], x.shape[1]])
        if self.lowpass_after_projection():
            projected = pointwise_conv(x, weight_low) if projected is None else projected
            low = spectral_lowpass2d(projected, self.keep)
        else:
            low = pointwise_conv(spectral_lowpass2d(x, self.keep), weight_low)
        return pointwise_conv(max_pool3x3_same(x), weight_max).add_(low)
