"""MSA-CPP U-Net: shapes (main and auxiliary), gradients, CPP pooling, the BCE + KL loss, overfit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_covidseg.models import get_network
from napari_covidseg.models.cpp_pooling import cpp_pool, exclusive_classes, kl_to_prediction
from napari_covidseg.models.msa_cpp_unet import (
    AUX_STRIDES,
    CBAM,
    BCECPPLoss,
    MSACPPUNet,
    MultiScaleAttention,
    conv_by_rows,
)
from napari_covidseg.models.unet import conv_bn_relu, decode_level
from network_helpers import hard_dice_per_class

TINY = dict(base=4)


def _two_class_target(b, h, w):
    yy, xx = np.mgrid[:h, :w]
    lung = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.35 * min(h, w)) ** 2
    inf = ((yy - h / 2) ** 2 + (xx - w / 2 - 0.1 * w) ** 2) < (0.12 * min(h, w)) ** 2
    t = torch.from_numpy(np.stack([lung, inf & lung]).astype(np.float32))
    return t[None].repeat(b, 1, 1, 1)


# --- CPP pooling ----------------------------------------------------------------------------------
def test_cpp_pool_hand_made_4x4():
    # classes 0/1/2 on a 4x4 map; per 2x2 cell the counts are known by construction
    labels = torch.tensor([[0, 0, 1, 2],
                           [0, 1, 2, 2],
                           [1, 1, 0, 0],
                           [1, 1, 0, 2]])
    onehot = F.one_hot(labels, 3).permute(2, 0, 1)[None].float()
    pooled = cpp_pool(onehot, 2)
    expected = torch.tensor([
        [[3, 1, 0], [0, 1, 3]],   # top-left: three 0, one 1; top-right: one 1, three 2
        [[0, 4, 0], [3, 0, 1]],   # bottom-left: four 1; bottom-right: three 0, one 2
    ], dtype=torch.float32) / 4
    assert pooled.shape == (1, 3, 2, 2)
    assert torch.allclose(pooled[0].permute(1, 2, 0), expected)
    whole = cpp_pool(onehot, 4)
    assert torch.allclose(whole[0, :, 0, 0], torch.tensor([6, 6, 4], dtype=torch.float32) / 16)


@pytest.mark.parametrize("size,s", [((5, 3), 2), ((13, 10), 4), ((17, 9), 16), ((8, 8), 1)])
def test_cpp_pool_partial_cells_are_fractions_of_real_pixels(size, s):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=size)
    onehot = torch.from_numpy(np.eye(3, dtype=np.float32)[labels]).permute(2, 0, 1)[None]
    pooled = cpp_pool(onehot, s).numpy()[0]
    rows, cols = -(-size[0] // s), -(-size[1] // s)
    assert pooled.shape == (3, rows, cols)
    for i in range(rows):
        for j in range(cols):
            cell = labels[i * s:(i + 1) * s, j * s:(j + 1) * s]
            for c in range(3):
                assert pooled[c, i, j] == pytest.approx((cell == c).mean(), abs=1e-6)
    assert np.allclose(pooled.sum(0), 1.0, atol=1e-6)
    ref = F.avg_pool2d(onehot, s, ceil_mode=True, count_include_pad=False)
    assert torch.allclose(torch.from_numpy(pooled), ref[0], atol=1e-6)


def test_cpp_pool_rejects_bad_input():
    with pytest.raises(ValueError):
        cpp_pool(torch.zeros(3, 4, 4), 2)
    with pytest.raises(ValueError):
        cpp_pool(torch.zeros(1, 3, 4, 4), 0)


def test_exclusive_classes_sum_to_one():
    t = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32).reshape(1, 2, 1, 4)
    classes = exclusive_classes(t)
    # pixel 0: background; 1: lung only; 2: infection in lung; 3: infection labelled outside lung
    assert classes[0, :, 0].T.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_kl_is_zero_at_target_and_positive_elsewhere():
    t = cpp_pool(exclusive_classes(_two_class_target(1, 16, 16)), 4)
    assert float(kl_to_prediction(t, torch.log(t.clamp_min(1e-12)))) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full_like(t, 1 / 3)
    assert float(kl_to_prediction(t, uniform.log())) > 0.01


# --- network ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(250, 250), (97, 131)])
def test_output_shapes_for_odd_sizes(size):
    torch.manual_seed(0)
    net = MSACPPUNet(**TINY).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        out = net(x, aux=True)
        plain = net(x)
    assert out["logits"].shape == (2, 2) + size
    # at inference (eval, no aux asked) the auxiliary heads are skipped; the logits do not change
    assert set(plain) == {"logits"} and torch.equal(plain["logits"], out["logits"])
    assert len(out["aux"]) == len(out["aux_logits"]) == 4
    for p, s in zip(out["aux"], AUX_STRIDES):
        assert p.shape == (2, 3, -(-size[0] // s), -(-size[1] // s))
        assert torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-5)
    # the loss accepts these outputs at this size (aux maps line up with the CPP targets)
    loss, terms = BCECPPLoss()(out, (torch.rand(2, 2, *size) > 0.5).float(), 0.0)
    assert torch.isfinite(loss) and set(terms) == {"bce", "cpp_2", "cpp_4", "cpp_8", "cpp_16"}


def test_training_mode_returns_the_auxiliary_maps():
    net = MSACPPUNet(**TINY).train()
    out = net(torch.rand(1, 1, 32, 32))
    assert len(out["aux"]) == len(out["aux_logits"]) == 4


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = MSACPPUNet(**TINY)
    x = torch.rand(2, 1, 48, 48)
    loss, _ = BCECPPLoss()(net(x), _two_class_target(2, 48, 48), 0.5)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"


def test_attention_modules_keep_shape():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 23)
    assert MultiScaleAttention(8)(x).shape == x.shape
    cbam = CBAM(8)
    y = cbam(x)
    assert y.shape == x.shape
    # CBAM only re-weights: every output is the input times a factor in (0, 1)
    ratio = y / x
    assert ((ratio > 0) & (ratio < 1)).all()


def test_loss_is_minimal_at_ground_truth():
    torch.manual_seed(0)
    size = (36, 36)
    target = _two_class_target(2, *size)
    classes = exclusive_classes(target)
    perfect_aux = [cpp_pool(classes, s) for s in AUX_STRIDES]
    perfect = {"logits": 20.0 * (2 * target - 1), "aux": perfect_aux}
    loss = BCECPPLoss()
    best, terms = loss(perfect, target, 0.0)
    assert float(best) < 1e-6
    assert all(abs(terms[f"cpp_{s}"]) < 1e-6 for s in AUX_STRIDES)
    # worse main logits, worse auxiliary probabilities, or both: always a higher loss
    uniform = [torch.full_like(p, 1 / 3) for p in perfect_aux]
    mixed = [0.7 * p + 0.3 / 3 for p in perfect_aux]
    noisy_logits = perfect["logits"] + 5 * torch.randn_like(perfect["logits"])
    for cand in ({"logits": perfect["logits"], "aux": uniform},
                 {"logits": perfect["logits"], "aux": mixed},
                 {"logits": noisy_logits, "aux": perfect_aux},
                 {"logits": -perfect["logits"], "aux": perfect_aux},
                 {"logits": torch.zeros_like(noisy_logits), "aux": mixed}):
        other, _ = loss(cand, target, 0.0)
        assert float(other) > float(best)
    # lambda scales only the auxiliary terms
    t_uni, _ = BCECPPLoss(lambda_cpp=0.0)({"logits": perfect["logits"], "aux": uniform}, target, 0.0)
    assert float(t_uni) < 1e-6


def test_loss_rejects_misaligned_aux_maps():
    target = _two_class_target(1, 32, 32)
    bad = {"logits": torch.zeros(1, 2, 32, 32), "aux": [torch.full((1, 3, 8, 8), 1 / 3)] * 4}
    with pytest.raises(ValueError, match="1/2"):
        BCECPPLoss()(bad, target, 0.0)


def test_registered_spec():
    spec = get_network("msa_cpp_unet")
    assert spec.recipe.optimizer == "rmsprop" and spec.recipe.epochs == 70 and spec.recipe.lr == 1e-3
    shipped = spec.create(**spec.shipped_kwargs)
    assert 0.5e6 < sum(p.numel() for p in shipped.parameters()) < 2e6


def test_tiny_network_overfits_one_phantom_slice():
    from napari_covidseg.phantom import make_phantom
    from napari_covidseg.preprocessing import preprocess

    spec = get_network("msa_cpp_unet")
    ph = make_phantom(shape=(8, 64, 64), seed=0)
    k = int(np.argmax(ph.infection.reshape(8, -1).sum(1)))
    x = torch.from_numpy(preprocess(ph.ct[k], spec.preprocessing))[None, None]
    target = torch.from_numpy(np.stack([ph.lung[k], ph.infection[k]]).astype(np.float32))[None]
    assert target[:, 1].sum() > 20
    torch.manual_seed(0)
    net = MSACPPUNet(base=8)
    loss_fn = spec.loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 70
    dices, aux_terms = [], []
    for step in range(steps):
        out = net(x)
        loss, terms = loss_fn(out, target, step / steps)
        dices.append(float(hard_dice_per_class(out["logits"].detach(), target).mean()))
        aux_terms.append(sum(v for key, v in terms.items() if key.startswith("cpp_")))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dices[0] < 0.3
    assert max(dices[-5:]) > 0.7, dices[::10]
    assert aux_terms[-1] < 0.5 * aux_terms[0]  # the auxiliary heads learn the class fractions too


def test_export_form_computes_what_the_plain_forward_does(monkeypatch):
    """The forms traced for ONNX Runtime (planes summed and maxed, CBAM's 2 -> 1 convolution as two
    depthwise maps, BatchNorm folded into proj_in) give the plain forward's logits, on random
    weights and BatchNorm statistics, at an odd size."""
    torch.manual_seed(0)
    model = _with_random_batch_norms(MSACPPUNet(base=8)).eval()
    x = torch.rand(2, 1, 70, 45)
    with torch.no_grad():
        plain = model(x)["logits"]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        exported = model(x)["logits"]
    assert exported.shape == plain.shape
    assert torch.allclose(exported, plain, atol=1e-4 * float(plain.abs().max()), rtol=0)
    assert not torch.equal(exported, plain)  # the other form ran (sums in another order round differently)


@pytest.mark.parametrize("k, shape", [(7, (2, 2, 19, 11)), (3, (1, 3, 5, 8)), (7, (1, 2, 4, 4))])
def test_conv_by_rows_is_the_same_convolution(k, shape):
    """CBAM's spatial convolution in its row form (export only) against ``F.conv2d``, including maps
    smaller than the kernel."""
    torch.manual_seed(0)
    maps, weight, bias = torch.randn(shape), torch.randn(1, shape[1], k, k), torch.randn(1)
    expected = F.conv2d(maps, weight, bias, padding=k // 2)
    got = conv_by_rows(maps, weight, bias)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_decoder_level_split_for_export_is_the_same(monkeypatch):
    """The decoder's convolution of [up-sampled, skip] as two convolutions added, BatchNorm folded
    (export only, parts of whole channel blocks), against the block on the concatenation; parts
    that are not whole blocks, and a training block, run as they are."""
    torch.manual_seed(0)
    block = _with_random_batch_norms(torch.nn.Sequential(conv_bn_relu(32, 6), conv_bn_relu(6, 6))).eval()
    up, skip = torch.randn(2, 16, 9, 13), torch.randn(2, 16, 9, 13)  # whole blocks of 16 and of 8
    unaligned = _with_random_batch_norms(torch.nn.Sequential(conv_bn_relu(20, 6), conv_bn_relu(6, 6))).eval()
    with torch.no_grad():
        plain = block(torch.cat([up, skip], dim=1))
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        split = decode_level(block, up, skip)
        up10, skip10 = up[:, :10], skip[:, :10]
        assert torch.equal(decode_level(unaligned, up10, skip10), unaligned(torch.cat([up10, skip10], dim=1)))
        assert torch.equal(decode_level(block.train(), up, skip), block(torch.cat([up, skip], dim=1)))
    assert torch.allclose(split, plain, atol=1e-5, rtol=0) and not torch.equal(split, plain)


def _with_random_batch_norms(model):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model


def test_padded_export_form_keeps_the_logits_and_its_padding_zero(monkeypatch):
    """The shipped width 12 is padded to 16 at full resolution for ONNX Runtime: the same logits
    (plain and traced forms), and the padding channels are exactly zero where the skip is taken."""
    torch.manual_seed(1)
    model = _with_random_batch_norms(MSACPPUNet(base=12)).eval()
    wide = model.export_form(block=16)
    assert wide is not model and model.stem[0].out_channels == 12  # a copy; the network is untouched
    assert [wide.stem[0].out_channels, wide.stages[0][0].proj_in.in_channels, wide.ups[-1].out_channels,
            wide.decoders[-1][0][0].in_channels, wide.head.in_channels] == [16, 16, 16, 32, 16]
    assert wide.stages[1][0].proj_in.in_channels == 24  # only the full-resolution width is padded
    skips = []
    wide.stages[0].register_forward_hook(lambda module, args, out: skips.append(out))
    x = torch.rand(2, 1, 70, 45)
    with torch.no_grad():
        plain = model(x)["logits"]
        padded = wide(x)["logits"]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        traced_form = wide(x)["logits"]
    tolerance = 1e-5 * float(plain.abs().max())
    assert torch.allclose(padded, plain, atol=tolerance, rtol=0)
    assert torch.allclose(traced_form, plain, atol=10 * tolerance, rtol=0)
    assert skips[0].shape[1] == 16 and skips[0][:, 12:].abs().max() == 0 and skips[0][:, :12].abs().max() > 0
    assert model.train().export_form() is model  # training runs the network itself
    assert MSACPPUNet(base=16).eval().export_form(block=16).stem[0].out_channels == 16
    assert MSACPPUNet(base=8).eval().export_form(block=8).stem[0].out_channels == 8  # AVX2's block
    assert model.eval().export_form(block=8).stem[0].out_channels == 16  # 12 is no multiple of 8 either
