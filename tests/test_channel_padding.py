"""Zero-padded layer copies (napari_covidseg.models.channel_padding): the real channels' outputs
are unchanged wherever they sit, the padding channels' outputs are exactly zero."""

import pytest
import torch
import torch.nn as nn

from napari_covidseg.models.channel_padding import padded_batch_norm, padded_conv, padded_transposed_conv, spread

IN_INDEX = torch.tensor([0, 2, 5])  # 3 real input channels placed among 6
OUT_INDEX = torch.tensor([1, 3, 4, 6])  # 4 real output channels placed among 8


def _placed(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    wide = torch.zeros(x.shape[0], width, *x.shape[2:])
    wide[:, index] = x
    return wide


def _check(layer, wide_layer, x, in_index, in_width, out_index, out_width):
    with torch.no_grad():
        expected, got = layer(x), wide_layer(_placed(x, in_index, in_width))
    assert got.shape[1] == out_width
    assert torch.allclose(got[:, out_index], expected, atol=1e-6)
    padding = torch.ones(out_width, dtype=torch.bool)
    padding[out_index] = False
    assert got[:, padding].abs().max() == 0


def test_plain_and_transposed_convolutions_keep_their_outputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    _check(conv, padded_conv(conv, OUT_INDEX, 8, IN_INDEX, 6), x, IN_INDEX, 6, OUT_INDEX, 8)
    up = nn.ConvTranspose2d(3, 4, 2, stride=2)
    _check(up, padded_transposed_conv(up, OUT_INDEX, 8, IN_INDEX, 6), x, IN_INDEX, 6, OUT_INDEX, 8)


def test_depthwise_convolutions_stay_depthwise():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7)
    conv = nn.Conv2d(4, 4, (1, 5), padding=(0, 2), groups=4)
    wide = padded_conv(conv, OUT_INDEX, 8, OUT_INDEX, 8)
    assert wide.groups == 8
    _check(conv, wide, x, OUT_INDEX, 8, OUT_INDEX, 8)
    with pytest.raises(ValueError, match="plain and depthwise"):
        padded_conv(nn.Conv2d(4, 4, 3, groups=2), OUT_INDEX, 8, OUT_INDEX, 8)


def test_batch_norm_maps_the_padding_to_zero_in_eval_mode():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-1, 1)
    norm.eval()
    wide = padded_batch_norm(norm, OUT_INDEX, 8)
    assert not wide.training
    _check(norm, wide, torch.randn(2, 4, 5, 5), OUT_INDEX, 8, OUT_INDEX, 8)


def test_the_channel_block_follows_the_cpu(monkeypatch):
    from napari_covidseg.models import channel_padding

    for capability, block in [("AVX512", 16), ("AVX512_BF16", 16), ("AVX2", 8), ("DEFAULT", 8)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert channel_padding.onnx_channel_block() == block


def test_spread_refuses_a_narrower_block():
    assert spread(3, 4, offset=4).tolist() == [4, 5, 6]
    with pytest.raises(ValueError):
        spread(5, 4)
