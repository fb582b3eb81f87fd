"""Spectral pooling keeps low frequencies and the mean, removes high frequencies; hybrid pooling halves sizes."""

import math

import pytest
import torch

from napari_covidseg.models.spectral_pooling import (
    HybridPool2d,
    HybridPoolBranch2d,
    global_spectral_pool2d,
    spectral_lowpass2d,
    spectral_pool2d,
)


def _smooth_image(h=64, w=48):
    """Periodic sinusoids plus a constant: all their frequencies lie inside the kept central half."""
    y = torch.arange(h, dtype=torch.float64)[:, None]
    x = torch.arange(w, dtype=torch.float64)[None, :]
    img = 2.0 + torch.sin(2 * math.pi * 2 * y / h) + 0.5 * torch.cos(2 * math.pi * 3 * x / w + 0.4)
    img = img + 0.3 * torch.sin(2 * math.pi * (y / h + 2 * x / w))
    return img.float()[None, None]


def _gaussian_bump(n=64):
    y = torch.arange(n, dtype=torch.float32)[:, None] - n / 2
    x = torch.arange(n, dtype=torch.float32)[None, :] - n / 2
    return (torch.exp(-(x**2 + y**2) / (2 * 6.0**2)))[None, None]


def _checkerboard(h=32, w=32):
    y = torch.arange(h)[:, None]
    x = torch.arange(w)[None, :]
    return ((x + y) % 2).float()[None, None] * 2 - 1  # +-1, zero mean, only the Nyquist frequency


def _bilinear_double(pooled):
    """Bilinear upsampling by 2 with the pooled grid's true sample positions and periodic wrap.

    Spectral pooling samples the band-limited image at the even pixels (pooled pixel i sits on
    original pixel 2i), not at pixel-pair centres as ``F.interpolate(align_corners=False)`` assumes;
    that half-pixel shift alone would dominate the error.
    """
    out = pooled
    for axis in (-2, -1):
        n = out.shape[axis]
        t = torch.arange(2 * n, dtype=torch.float32) / 2
        i0 = t.floor().long()
        frac = (t - i0).view([-1, 1] if axis == -2 else [1, -1])
        out = (1 - frac) * out.index_select(axis, i0 % n) + frac * out.index_select(axis, (i0 + 1) % n)
    return out


def test_low_frequency_image_survives_pool_and_upsample():
    for img in (_smooth_image(), _gaussian_bump()):
        pooled = spectral_pool2d(img)
        assert pooled.shape[-2:] == (img.shape[-2] // 2, img.shape[-1] // 2)
        back = _bilinear_double(pooled)
        rel = float((back - img).norm() / img.norm())
        assert rel < 0.05, rel


def test_band_limited_image_is_resampled_exactly():
    """Inside the kept band, spectral pooling is exact resampling: compare with the analytic half-size image."""
    img = _smooth_image(64, 48)
    pooled = spectral_pool2d(img)
    # the same continuous function sampled at every other pixel
    assert torch.allclose(pooled, img[..., ::2, ::2], atol=1e-4)


def test_checkerboard_is_removed_and_mean_kept():
    board = _checkerboard()
    assert float(spectral_pool2d(board).abs().max()) < 1e-5
    assert float(spectral_lowpass2d(board).abs().max()) < 1e-5
    shifted = board + 3.0
    assert torch.allclose(spectral_pool2d(shifted), torch.full((1, 1, 16, 16), 3.0), atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (31, 45), (7, 10)])
def test_mean_is_kept_for_any_size(size):
    torch.manual_seed(0)
    x = torch.rand((2, 3) + size) * 5
    for y in (spectral_pool2d(x), spectral_lowpass2d(x), spectral_pool2d(x, (3, 2))):
        assert torch.allclose(y.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-4)
    # the global spectral pool is the DC term of the (forward-normalised) spectrum
    dc = torch.fft.fft2(x, norm="forward")[..., 0, 0].real
    assert torch.allclose(global_spectral_pool2d(x)[..., 0, 0], dc, atol=1e-5)


def test_lowpass_keeps_smooth_image_and_size():
    img = _smooth_image()
    out = spectral_lowpass2d(img)
    assert out.shape == img.shape
    assert float((out - img).norm() / img.norm()) < 1e-4


def test_spectral_pool_rejects_growing():
    with pytest.raises(ValueError, match="only shrink"):
        spectral_pool2d(torch.zeros(1, 1, 8, 8), (16, 8))


def test_hybrid_pool_shapes_and_gradients():
    torch.manual_seed(0)
    pool = HybridPool2d(4, 6)
    branch = HybridPoolBranch2d(4, 5)
    x = torch.randn(2, 4, 16, 12, requires_grad=True)
    y = pool(x)
    z = branch(x)
    assert y.shape == (2, 6, 8, 6) and z.shape == (2, 5, 16, 12)
    (y.sum() + z.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    for p in list(pool.parameters()) + list(branch.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("shape", [(1, 16, 64, 64), (2, 3, 5, 7), (1, 4, 2, 9), (1, 1, 1, 6), (3, 2, 9, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool3x3_same_equals_the_pytorch_pool_exactly(shape, channels_last):
    """Without gradients the running-max formulation, with them PyTorch's pool: equal values (NaN and
    infinities included), the input's layout kept, and gradients to PyTorch's arg-max elements."""
    from napari_covidseg.models.spectral_pooling import max_pool3x3_same

    x = torch.randn(shape)
    x.view(-1)[:: 7] = 0.0  # ties
    x.view(-1)[3] = float("inf")
    if x.numel() > 10:
        x.view(-1)[10] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    with torch.no_grad():
        got = max_pool3x3_same(x)
    assert torch.equal(torch.nan_to_num(got, nan=1234.5), torch.nan_to_num(expected, nan=1234.5))
    assert got.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_(True)
    max_pool3x3_same(leaf).sum().backward()
    reference = x.clone().requires_grad_(True)
    torch.nn.functional.max_pool2d(reference, 3, stride=1, padding=1).sum().backward()
    assert torch.equal(leaf.grad, reference.grad)
