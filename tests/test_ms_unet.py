"""MS-UNet: shapes, gradients, SIM/HMM properties, the BCE + UAL loss and its cosine ramp, overfit."""

import numpy as np
import pytest
import torch

from napari_covidseg.models import get_network
from napari_covidseg.models.ms_unet import (
    BCEUncertaintyLoss,
    HierarchicalMixing,
    MSUNet,
    ScaleIntegration,
    adaptive_pool_by_gathers,
    cosine_ramp,
    hybrid_pool,
    pool_three_to_two,
    softmax_over_three,
    uncertainty_aware_loss,
)
from network_helpers import hard_dice_per_class

TINY = dict(base=4, mid=8)


def _two_class_target(b, h, w, seed=0):
    """Lung = a centred disk, infection = a smaller disk inside it, so both classes are present."""
    yy, xx = np.mgrid[:h, :w]
    lung = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.35 * min(h, w)) ** 2
    inf = ((yy - h / 2) ** 2 + (xx - w / 2 - 0.1 * w) ** 2) < (0.12 * min(h, w)) ** 2
    t = torch.from_numpy(np.stack([lung, inf & lung]).astype(np.float32))
    return t[None].repeat(b, 1, 1, 1)


@pytest.mark.parametrize("size", [(250, 250), (97, 131)])
def test_output_shape_for_odd_sizes(size):
    torch.manual_seed(0)
    net = MSUNet(**TINY).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size))
    assert out["logits"].shape == (2, 2) + size
    assert torch.isfinite(out["logits"]).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = MSUNet(**TINY)
    x = torch.rand(2, 1, 40, 40)
    target = _two_class_target(2, 40, 40)
    loss, terms = BCEUncertaintyLoss()(net(x), target, 0.5)
    loss.backward()
    assert set(terms) == {"bce", "ual", "gamma"}
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"


def test_sim_attention_sums_to_one_and_output_has_main_size():
    torch.manual_seed(0)
    sim = ScaleIntegration(6).eval()
    small, main, large = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 10, 14), torch.randn(2, 6, 15, 21)
    with torch.no_grad():
        s, m, l, attn = sim.attention(small, main, large)
        fused = sim(small, main, large)
    assert attn.shape == (2, 3, 10, 14)
    assert torch.allclose(attn.sum(dim=1), torch.ones(2, 10, 14), atol=1e-6)
    assert (attn >= 0).all()
    assert s.shape == m.shape == l.shape == fused.shape == (2, 6, 10, 14)
    # the fused map is the attention-weighted sum of the three aligned branches
    expected = attn[:, :1] * s + attn[:, 1:2] * m + attn[:, 2:] * l
    assert torch.allclose(fused, expected, atol=1e-6)


def test_hybrid_pool_is_max_plus_mean_per_cell():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    pooled = hybrid_pool(x, (2, 2))
    cells = x.reshape(1, 1, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(1, 1, 2, 2, 4)
    assert torch.allclose(pooled, cells.amax(-1) + cells.mean(-1))


@pytest.mark.parametrize("size_in, size_out", [((96, 96), (64, 64)), ((7, 9), (5, 4)), ((33, 22), (22, 15)),
                                               ((16, 16), (16, 16)), ((12, 10), (4, 5))])
def test_pooling_by_gathers_equals_adaptive_pooling(size_in, size_out):
    """The ONNX form of SIM's pooling (1.5x -> 1x is not an integer ratio) is PyTorch's own."""
    x = torch.randn((2, 3) + size_in, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adaptive_pool_by_gathers(x, size_out, "max"), torch.nn.functional.adaptive_max_pool2d(x, size_out))
    torch.testing.assert_close(adaptive_pool_by_gathers(x, size_out, "mean"),
                               torch.nn.functional.adaptive_avg_pool2d(x, size_out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size_in", [(3, 3), (6, 12), (48, 96), (384, 384)])
def test_three_to_two_pooling_equals_adaptive_pooling(size_in, monkeypatch):
    """The ONNX form of the 1.5x branch's pooling (3k -> 2k: pairs of rows, then of columns, from
    strided slices) is adaptive max + mean pooling, and ``hybrid_pool`` takes it while exporting."""
    def adaptive(t, size):
        return torch.nn.functional.adaptive_max_pool2d(t, size) + torch.nn.functional.adaptive_avg_pool2d(t, size)

    x = torch.randn((2, 3) + size_in, generator=torch.Generator().manual_seed(0))
    size_out = tuple(n * 2 // 3 for n in size_in)
    torch.testing.assert_close(pool_three_to_two(x), adaptive(x, size_out), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(hybrid_pool(x, size_out), adaptive(x, size_out), rtol=1e-6, atol=1e-6)
    odd = (size_out[0], size_out[1] - 1)  # not 3:2 along the columns: the gathers
    torch.testing.assert_close(hybrid_pool(x[..., :-1], odd), adaptive(x[..., :-1], odd), rtol=1e-6, atol=1e-6)


def test_softmax_over_three_is_the_channel_softmax_in_both_forms(monkeypatch):
    """The written-out form an ONNX export takes (large logits included: it subtracts the maximum)."""
    x = torch.randn((2, 3, 5, 7), generator=torch.Generator().manual_seed(0)) * 30
    expected = torch.softmax(x, dim=1)
    torch.testing.assert_close(softmax_over_three(x), expected)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(softmax_over_three(x), expected)


@pytest.mark.parametrize("groups", [2, 4])
def test_hmm_preserves_shape(groups):
    torch.manual_seed(0)
    hmm = HierarchicalMixing(8, groups=groups).eval()
    x = torch.randn(2, 8, 13, 9)
    with torch.no_grad():
        y = hmm(x)
    assert y.shape == x.shape
    assert (y >= 0).all()  # final ReLU after the residual


def _hmm_gating_the_concatenation(hmm, x):
    """HMM as the figure draws it: the modulators concatenated, then the gate (pool, MLP, softmax)."""
    parts = hmm.expand(x).chunk(hmm.groups, dim=1)
    features, modulators, passed = [], [], None
    for j, (part, block) in enumerate(zip(parts, hmm.interact)):
        out = block(part if passed is None else torch.cat([part, passed], dim=1))
        feat, *rest = out.chunk(3 if j < hmm.groups - 1 else 2, dim=1)
        passed, mod = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
        features.append(feat)
        modulators.append(mod)
    gate = hmm.gate(torch.cat(modulators, dim=1))
    return torch.relu(hmm.fuse(torch.cat(features, dim=1) * gate) + x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_hmm_pooling_each_modulator_equals_gating_the_concatenation(channels_last):
    torch.manual_seed(0)
    hmm = HierarchicalMixing(16, groups=4).eval()
    for bn in (m for m in hmm.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 24, 20)
    if channels_last:
        hmm, x = hmm.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(hmm(x), _hmm_gating_the_concatenation(hmm, x), rtol=1e-5, atol=1e-6)


def test_cosine_ramp_endpoints_and_monotone():
    loss = BCEUncertaintyLoss(gamma_min=0.1, gamma_max=1.0)
    assert loss.gamma(0.0) == pytest.approx(0.1)
    assert loss.gamma(1.0) == pytest.approx(1.0)
    assert loss.gamma(0.5) == pytest.approx(0.55)
    values = [loss.gamma(p) for p in np.linspace(0, 1, 51)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] < values[26] - values[25]  # slow start: cosine, not linear
    # progress outside [0, 1] (e.g. a resumed run) is clamped
    assert cosine_ramp(-0.5, 0.0, 1.0) == 0.0 and cosine_ramp(2.0, 0.0, 1.0) == 1.0
    assert BCEUncertaintyLoss().gamma(0.0) == 0.0  # ZoomNet's default endpoints


def test_ual_values():
    assert float(uncertainty_aware_loss(torch.zeros(1, 2, 3, 3))) == pytest.approx(1.0)
    assert float(uncertainty_aware_loss(torch.full((1, 2, 3, 3), 30.0))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_loss_is_minimal_at_ground_truth(progress):
    torch.manual_seed(0)
    target = _two_class_target(2, 24, 24)
    loss = BCEUncertaintyLoss()
    perfect = 20.0 * (2 * target - 1)
    best, _ = loss({"logits": perfect}, target, progress)
    assert float(best) < 1e-6
    flipped = perfect.clone()
    flipped[:, 1, 10:12, 10:12] *= -1
    candidates = [perfect + torch.randn_like(perfect) * 5 for _ in range(5)]
    candidates += [0.2 * perfect, flipped, torch.zeros_like(perfect), -perfect]
    for logits in candidates:
        other, _ = loss({"logits": logits}, target, progress)
        assert float(other) > float(best)


def test_registered_sizes_match_docstring():
    spec = get_network("ms_unet")
    default = spec.create()
    n_default = sum(p.numel() for p in default.parameters())
    assert 12.5e6 < n_default < 13.8e6  # paper: 13.40 M
    shipped = spec.create(**spec.shipped_kwargs)
    n_shipped = sum(p.numel() for p in shipped.parameters())
    assert 0.5e6 < n_shipped < 2e6
    assert spec.stride == 32 and spec.recipe.optimizer == "adam" and spec.recipe.epochs == 100


def test_tiny_network_overfits_one_phantom_slice():
    from napari_covidseg.phantom import make_phantom
    from napari_covidseg.preprocessing import preprocess

    spec = get_network("ms_unet")
    ph = make_phantom(shape=(8, 64, 64), seed=0)
    k = int(np.argmax(ph.infection.reshape(8, -1).sum(1)))
    x = torch.from_numpy(preprocess(ph.ct[k], spec.preprocessing))[None, None]
    target = torch.from_numpy(np.stack([ph.lung[k], ph.infection[k]]).astype(np.float32))[None]
    assert target[:, 1].sum() > 20
    torch.manual_seed(0)
    net = MSUNet(base=8, mid=16)
    loss_fn = spec.loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 90
    dices = []
    for step in range(steps):
        out = net(x)
        loss, _ = loss_fn(out, target, step / steps)
        dices.append(float(hard_dice_per_class(out["logits"].detach(), target).mean()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dices[0] < 0.3
    assert max(dices[-5:]) > 0.7, dices[::10]


def test_export_form_gives_the_plain_logits(monkeypatch):
    """While exporting, the 0.5x / 1.5x inputs are resized by a scale factor and the 1.5x pooling is
    written as 2x2 pooling and slices: the same logits (sizes that are not multiples of 32 too)."""
    torch.manual_seed(0)
    model = MSUNet(base=4, mid=8).eval()
    for size in [(64, 96), (50, 70)]:
        x = torch.rand(1, 1, *size)
        with torch.no_grad():
            plain = model(x)["logits"]
            monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
            exported = model(x)["logits"]
            monkeypatch.undo()
        torch.testing.assert_close(exported, plain, rtol=1e-5, atol=1e-5)
