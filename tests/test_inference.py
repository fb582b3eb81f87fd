"""Whole-volume inference: batching, padding, resizing, sliding window, progress, cancel, devices."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_covidseg.checkpoint import LoadedModel
from napari_covidseg.errors import CancelledError, InputError
from napari_covidseg.inference import _forward_logits, _gaussian_weights, _starts, predict_volume, resolve_device, segment_volume
from napari_covidseg.models import get_network
from napari_covidseg.preprocessing import Preprocessing

MINMAX = Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax")


def _ct(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1100, 200, size=shape).astype(np.float32)


def _small_unet(seed=0):
    torch.manual_seed(seed)
    return get_network("unet").create(base=4, depth=2).eval()


class Pointwise(nn.Module):
    """Output of each voxel depends only on that voxel: any tiling gives the same answer."""

    def __init__(self, dims):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([3.0, -2.0]).view((2, 1) + (1,) * dims))
            self.conv.bias.copy_(torch.tensor([-1.0, 0.5]))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return {"logits": self.conv(x)}


class Conv3x3x3(nn.Module):
    """A small-receptive-field 3D model for checking the tiling against a whole-volume pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1, padding_mode="replicate")

    def forward(self, x):
        return {"logits": self.conv(x)}


def _reference(model, volume, dims):
    with torch.no_grad():
        x = torch.from_numpy(volume)
        if dims == 2:
            return torch.sigmoid(model(x[:, None])["logits"]).permute(1, 0, 2, 3).numpy()
        return torch.sigmoid(model(x[None, None])["logits"])[0].numpy()


# ---------------------------------------------------------------------------------------- device
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_resolve_cuda_without_gpu_is_a_clear_error():
    for choice in ("cuda", "cuda:1", "CUDA:0"):
        with pytest.raises(InputError, match="CUDA is not available.*use 'cpu' or 'auto'"):
            resolve_device(choice)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_cuda_index_out_of_range():
    with pytest.raises(InputError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------------------------------- 2D
def test_2d_independent_of_batch_size_and_odd_sizes():
    model = _small_unet()
    ct = _ct((5, 37, 50))  # neither side a multiple of the stride
    spec = get_network("unet")
    results = [predict_volume(model, spec, ct, (2.0, 0.8, 0.8), MINMAX, device="cpu", batch_size=b) for b in (1, 2, 5, 8)]
    assert results[0].shape == (2, 5, 37, 50) and results[0].dtype == np.float32
    assert ((results[0] >= 0) & (results[0] <= 1)).all()
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5)


def test_2d_matches_slice_by_slice_reference_when_no_padding_needed():
    model = Pointwise(2)
    ct = _ct((3, 32, 48))
    got = predict_volume(model, 2, ct, (1, 1, 1), MINMAX, device="cpu", batch_size=2)
    expected = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_2d_pads_to_stride_and_crops_back():
    model = Pointwise(2)
    ct = _ct((2, 21, 35))
    got = predict_volume(model, 2, ct, (1, 1, 1), MINMAX, device="cpu", batch_size=4)
    assert model.seen == [(2, 1, 32, 48)]  # padded to the stride (16)
    expected = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # pointwise: padding must not shift voxels


def test_2d_inplane_resize_path():
    model = Pointwise(2)
    ct = np.full((2, 40, 60), -500.0, dtype=np.float32)
    ct[:, :20] = 100.0  # two flat halves
    prep = Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax", inplane_size=(64, 64))
    got = predict_volume(model, 2, ct, (1, 1, 1), prep, device="cpu", batch_size=1)
    assert model.seen == [(1, 1, 64, 64)] * 2
    assert got.shape == (2, 2, 40, 60)
    flat = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 2)
    # away from the edge between the halves the resized result equals the direct one
    np.testing.assert_allclose(got[:, :, :15], flat[:, :, :15], atol=1e-5)
    np.testing.assert_allclose(got[:, :, 25:], flat[:, :, 25:], atol=1e-5)
    # and it is a smooth blend across the edge, not a copy of the other side
    assert np.all(np.diff(got[0, 0, :, 30]) <= 1e-6)


def test_zscore_uses_whole_volume_statistics():
    model = Pointwise(2)
    ct = _ct((4, 16, 16))
    ct[2:] += 300.0  # later slices brighter: per-slice normalisation would hide that
    prep = Preprocessing(hu_min=-1250, hu_max=250, normalisation="zscore")
    got = predict_volume(model, 2, ct, (1, 1, 1), prep, device="cpu", batch_size=1)
    clipped = np.clip(ct, -1250, 250)
    expected = _reference(model, ((clipped - clipped.mean()) / clipped.std()).astype(np.float32), 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_progress_and_cancel_2d():
    model = Pointwise(2)
    calls = []
    predict_volume(model, 2, _ct((7, 16, 16)), (1, 1, 1), MINMAX, device="cpu", batch_size=3,
                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    seen_before = len(model.seen)
    checks = []

    def cancel_after_two():
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(CancelledError, match="cancelled"):
        predict_volume(model, 2, _ct((7, 16, 16)), (1, 1, 1), MINMAX, device="cpu", batch_size=1,
                       should_cancel=cancel_after_two)
    assert len(model.seen) - seen_before < 7


def test_bad_inputs():
    model = Pointwise(2)
    with pytest.raises(InputError, match="3 dimensions"):
        predict_volume(model, 2, np.zeros((4, 4)), (1, 1, 1), MINMAX, device="cpu")
    with pytest.raises(InputError, match="spacing"):
        predict_volume(model, 2, np.zeros((2, 4, 4)), (1, 0, 1), MINMAX, device="cpu")
    with pytest.raises(InputError, match="batch size"):
        predict_volume(model, 2, np.zeros((2, 4, 4)), (1, 1, 1), MINMAX, device="cpu", batch_size=0)


# ---------------------------------------------------------------------------------------- 3D
def test_starts_cover_axis_flush_with_border():
    assert _starts(100, 40, 20) == [0, 20, 40, 60]
    assert _starts(105, 40, 20) == [0, 20, 40, 60, 65]
    assert _starts(30, 40, 20) == [0]
    for size, patch, step in [(37, 16, 8), (64, 16, 8), (17, 16, 8), (50, 20, 1)]:
        starts = _starts(size, patch, step)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + patch] = True
        assert covered.all() and starts[-1] + patch == size


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_sliding_window_equals_one_pass_for_pointwise_model(weighting):
    model = Pointwise(3)
    ct = _ct((13, 30, 27))
    calls = []
    got = predict_volume(model, 3, ct, (1, 1, 1), MINMAX, device="cpu", patch_size=(8, 16, 16), overlap=0.5,
                         weighting=weighting, progress=lambda d, t: calls.append((d, t)))
    n_windows = len(_starts(13, 8, 4)) * len(_starts(30, 16, 8)) * len(_starts(27, 16, 8))
    assert calls[-1] == (n_windows, n_windows) and len(calls) == n_windows
    expected = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # exact on borders and overlaps


def test_sliding_window_overlap_averaging_is_exact():
    """A model whose output is its patch's position shows how overlaps are averaged."""

    class PatchId(nn.Module):
        def __init__(self):
            super().__init__()
            self.count = 0

        def forward(self, x):
            self.count += 1
            logit = torch.logit(torch.tensor(0.1 * self.count))
            return {"logits": torch.full((x.shape[0], 2) + x.shape[2:], float(logit))}

    model = PatchId()
    got = predict_volume(model, 3, _ct((16, 16, 24)), (1, 1, 1), MINMAX, device="cpu", patch_size=(16, 16, 16),
                         overlap=0.5)
    # windows along x start at 0 and 8: x < 8 only the first (0.1), x >= 16 only the second (0.2)
    assert model.count == 2
    np.testing.assert_allclose(got[:, :, :, :8], 0.1, atol=1e-6)
    np.testing.assert_allclose(got[:, :, :, 8:16], 0.15, atol=1e-6)
    np.testing.assert_allclose(got[:, :, :, 16:], 0.2, atol=1e-6)


def test_sliding_window_close_to_whole_volume_for_local_model():
    model = Conv3x3x3()
    ct = _ct((12, 20, 20))
    one_pass = predict_volume(model, 3, ct, (1, 1, 1), MINMAX, device="cpu", patch_size=(12, 20, 20))
    tiled = predict_volume(model, 3, ct, (1, 1, 1), MINMAX, device="cpu", patch_size=(8, 12, 12), overlap=0.5)
    assert one_pass.shape == tiled.shape == (2, 12, 20, 20)
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    # only voxels next to a patch border inside the volume differ (replicate padding there)
    assert np.abs(one_pass - tiled).mean() < 0.02
    assert np.isfinite(tiled).all() and tiled[inner].std() > 0.01


def test_volume_smaller_than_patch_is_padded_to_stride():
    model = Pointwise(3)
    ct = _ct((5, 20, 9))
    got = predict_volume(model, 3, ct, (1, 1, 1), MINMAX, device="cpu", patch_size=(80, 160, 160))
    assert model.seen == [(1, 1, 16, 32, 16)]
    expected = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_resampling_to_target_spacing_and_back():
    model = Pointwise(3)
    ct = np.full((10, 24, 24), -800.0, dtype=np.float32)
    ct[:, :, 12:] = 0.0
    prep = Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax", target_spacing=(2.0, 2.0, 2.0))
    got = predict_volume(model, 3, ct, (1.0, 1.0, 1.0), prep, device="cpu", patch_size=(16, 16, 16))
    assert model.seen == [(1, 1, 16, 16, 16)]  # 10x24x24 at 1 mm -> 5x12x12 at 2 mm, padded to 16
    assert got.shape == (2, 10, 24, 24)
    flat = _reference(model, np.clip((ct + 1250) / 1500, 0, 1).astype(np.float32), 3)
    np.testing.assert_allclose(got[:, :, :, :8], flat[:, :, :, :8], atol=1e-5)
    np.testing.assert_allclose(got[:, :, :, 16:], flat[:, :, :, 16:], atol=1e-5)


def test_cancel_3d():
    with pytest.raises(CancelledError):
        predict_volume(Pointwise(3), 3, _ct((8, 32, 32)), (1, 1, 1), MINMAX, device="cpu", patch_size=(8, 16, 16),
                       should_cancel=lambda: True)


# ---------------------------------------------------------------------------------------- segment
def test_segment_volume_thresholds_probabilities():
    spec = get_network("unet")
    loaded = LoadedModel(model=Pointwise(2), spec=spec, network="unet", network_kwargs={}, preprocessing=MINMAX)
    ct = _ct((3, 16, 16))
    result = segment_volume(loaded, ct, (1, 1, 1), threshold=0.4, device="cpu", probabilities=True,
                            probability_dtype="float32")
    assert result.lung.dtype == np.uint8 and result.infection.shape == (3, 16, 16)
    assert result.probabilities.dtype == np.float32
    np.testing.assert_array_equal(result.lung, (result.probabilities[0] > 0.4).astype(np.uint8))
    np.testing.assert_array_equal(result.infection, (result.probabilities[1] > 0.4).astype(np.uint8))
    assert 0 < result.lung.sum() < result.lung.size and result.network == "unet"
    with pytest.raises(InputError, match="threshold"):
        segment_volume(loaded, ct, (1, 1, 1), threshold=1.5, device="cpu")


@pytest.mark.parametrize("network", ["unet", "qchc_unet3d"])
def test_probabilities_only_when_asked_float16_by_default_and_masks_unchanged(network):
    spec = get_network(network)
    loaded = LoadedModel(model=Pointwise(spec.dims), spec=spec, network=network, network_kwargs={}, preprocessing=MINMAX)
    ct = _ct((9, 24, 20))
    kwargs = dict(threshold=0.45, device="cpu", patch_size=(4, 16, 16))
    plain = segment_volume(loaded, ct, (1, 1, 1), **kwargs)
    half = segment_volume(loaded, ct, (1, 1, 1), probabilities=True, **kwargs)
    full = segment_volume(loaded, ct, (1, 1, 1), probabilities=True, probability_dtype="float32", **kwargs)
    assert plain.probabilities is None
    assert half.probabilities.dtype == np.float16 and full.probabilities.dtype == np.float32
    np.testing.assert_allclose(half.probabilities, full.probabilities, atol=1e-3)
    for result in (half, full):  # masks come from the float32 values whatever is kept
        np.testing.assert_array_equal(result.lung, plain.lung)
        np.testing.assert_array_equal(result.infection, plain.infection)
    np.testing.assert_array_equal(plain.lung, (full.probabilities[0] > 0.45).astype(np.uint8))
    with pytest.raises(InputError, match="float16 or float32"):
        segment_volume(loaded, ct, (1, 1, 1), probabilities=True, probability_dtype="float64", **kwargs)


def test_3d_bands_and_resampling_equal_the_whole_volume_computation():
    """The banded sliding window and the streamed resampling give what whole-volume trilinear
    resampling and one accumulator for the whole volume give."""
    model = Conv3x3x3()
    ct = _ct((23, 30, 26), seed=3)
    prep = Preprocessing(hu_min=-1250, hu_max=250, normalisation="zscore", target_spacing=(1.6, 1.3, 1.1))
    got = predict_volume(model, 3, ct, (1.0, 1.0, 1.0), prep, device="cpu", patch_size=(6, 12, 12), overlap=0.5,
                         weighting="gaussian")
    grid = tuple(int(round(n / t)) for n, t in zip(ct.shape, (1.6, 1.3, 1.1)))
    clipped = torch.from_numpy(np.clip(ct, -1250, 250))[None, None]
    small = F.interpolate(clipped, size=grid, mode="trilinear", align_corners=False)[0, 0]
    small = (small - small.mean()) / small.std(unbiased=False)
    patch, steps = (6, 12, 12), (3, 6, 6)
    sums, weights = torch.zeros((2,) + grid), torch.zeros(grid)
    w = _gaussian_weights(patch)
    with torch.no_grad():
        for a in _starts(grid[0], 6, 3):
            for b in _starts(grid[1], 12, 6):
                for c in _starts(grid[2], 12, 6):
                    region = (slice(a, a + 6), slice(b, b + 12), slice(c, c + 12))
                    prob = torch.sigmoid(_forward_logits(model, small[region][None, None], 16))[0]
                    sums[(slice(None),) + region] += prob * w
                    weights[region] += w
    expected = F.interpolate((sums / weights)[None], size=ct.shape, mode="trilinear", align_corners=False)[0]
    np.testing.assert_allclose(got, expected.clamp(0, 1).numpy(), atol=1e-5)


def test_gaussian_weights_positive_and_centred():
    w = _gaussian_weights((8, 16, 16))
    assert w.shape == (8, 16, 16) and float(w.min()) > 0
    assert float(w[3:5, 7:9, 7:9].min()) == pytest.approx(float(w.max()))
