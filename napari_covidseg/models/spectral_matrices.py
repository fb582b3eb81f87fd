"""CHS-Net's spectral pooling and spectral low-pass as matrix products, for graphs without FFTs.

ONNX Runtime has no real FFT that PyTorch's exporter writes (``aten::fft_rfft`` has no ONNX
symbolic, and the newer exporter cannot pad complex tensors), so the network it runs computes the
same linear maps as matrix products (:mod:`.spectral_pooling` switches to this module while
PyTorch exports a graph).

Why the maps are two separable terms
------------------------------------
Along one axis, "FFT, keep the band, inverse FFT" is a complex matrix ``C = R + iI`` (``m x n``:
``m = n`` for the low-pass, ``m`` the output length for spectral pooling).  Both operations are the
real part of ``Cy X Cx^T`` for a map ``X`` (see :mod:`.spectral_pooling`; the low-pass's symmetric
half mask is exactly that real part), which is ``Ry X Rx^T - Iy X Ix^T``.

Why factored
------------
``I`` comes from the one unpaired frequency of an even band only, so it has rank 2 at most (0 for
odd bands).  The low-pass's ``R`` keeps about half the frequencies and has rank about ``n / 2``.
With ``R = P Q^T`` and ``I = U V^T`` (from a float64 SVD in NumPy, rank cut at 1e-9 of the
operator's norm), both terms come from one product ``Z = [Q V]^T X [Qx Vx]`` masked to its two
diagonal blocks, with the sign of each: ``Y = [P U] (Z * mask) [Px Ux]^T``.  At 256 x 256 that
is about 52 MFLOP a channel for the low-pass, 2.6 times fewer than the two dense terms.

The products give the FFT code's numbers to float rounding (``tests/test_spectral_matrices.py``).
They are used for export only: PyTorch's FFTs are faster than these products in PyTorch.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
import torch


def kept_frequencies(m: int) -> List[int]:
    """Signed frequencies of the centre crop of length ``m``, in the (unshifted) order of a length-``m`` FFT axis.

    ``fftshift``, keeping the ``m`` entries centred on DC and ``ifftshift`` keep the frequencies
    ``-(m // 2) .. m - 1 - m // 2``; output index ``r`` holds frequency ``r`` for the non-negative
    ones and ``r - m`` for the others.  For even ``m`` the most negative one, ``-m/2``, is the
    Nyquist frequency of the output and has no positive partner.
    """
    return [r if r <= m - 1 - m // 2 else r - m for r in range(m)]


def lowpass_operator(n: int, m: int) -> np.ndarray:
    """Complex ``n x n`` matrix: FFT, keep the centred band of ``m`` frequencies, inverse FFT."""
    mask = np.zeros(n)
    mask[[f % n for f in kept_frequencies(m)]] = 1.0
    return np.fft.ifft(np.fft.fft(np.eye(n), axis=0) * mask[:, None], axis=0)


def pooling_operator(n: int, m: int) -> np.ndarray:
    """Complex ``m x n`` matrix: FFT (divided by ``n``), keep the centred ``m`` frequencies, inverse FFT at length ``m``."""
    spectrum = np.fft.fft(np.eye(n), axis=0, norm="forward")
    return np.fft.ifft(spectrum[[f % n for f in kept_frequencies(m)]], axis=0, norm="forward")


def _factor(matrix: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` with ``P @ Q.T == matrix`` and as few columns as its rank, singular values under
    1e-9 of ``scale`` counting as zero (the rounding left in an odd band's imaginary part)."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    rank = int((s > 1e-9 * scale).sum())
    return u[:, :rank] * s[:rank], vh[:rank].T


def axis_factors(operator: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(left, right, sign)`` of one axis: ``left = [P U]``, ``right = [Q V]`` and +1 / -1 per column
    for the real / imaginary part."""
    scale = float(np.linalg.norm(operator, 2))
    p, q = _factor(operator.real, scale)
    u, v = _factor(operator.imag, scale)
    sign = np.concatenate([np.ones(p.shape[1]), -np.ones(u.shape[1])])
    return np.concatenate([p, u], axis=1), np.concatenate([q, v], axis=1), sign


@functools.lru_cache(maxsize=64)
def _products(kind: str, h: int, w: int, oh: int, ow: int) -> Tuple[torch.Tensor, ...]:
    """``(left_y, right_y^T, mask, right_x, left_x^T)`` as float32 tensors for a map of ``h x w`` (cached).

    Computed in NumPy (float64), so that a graph being traced holds them as constants.
    """
    operator = lowpass_operator if kind == "lowpass" else pooling_operator
    left_y, right_y, sign_y = axis_factors(operator(h, oh))
    left_x, right_x, sign_x = axis_factors(operator(w, ow))
    same_part = sign_y[:, None] == sign_x[None, :]  # real with real, imaginary with imaginary
    mask = same_part * sign_y[:, None]  # +1 for the real term, -1 for the imaginary one
    arrays = (left_y, right_y.T, mask, right_x, left_x.T)
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


def apply(x: torch.Tensor, kind: str, out_size: Tuple[int, int]) -> torch.Tensor:
    """The ``kind`` ("lowpass": band of ``out_size`` frequencies kept at the input's size; "pool":
    resized to ``out_size``) of the last two dims of ``x``, as matrix products."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    # the constants take the map's dtype (a trace records no cast of the map)
    products = (t.to(device=x.device, dtype=x.dtype) for t in _products(kind, h, w, *map(int, out_size)))
    left_y, right_y_t, mask, right_x, left_x_t = products
    return left_y @ (((right_y_t @ x) @ right_x) * mask) @ left_x_t
