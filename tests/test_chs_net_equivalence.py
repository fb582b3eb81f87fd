"""The fast CHS-Net computes what the plain formulation computed (frozen in ``chs_net_reference.py``).

The reference is the code before the CPU speed-up (complex FFT + fftshift spectral pooling,
contiguous layout, plain 1x1 convolutions).  Checked: spectral pooling and the spectral low-pass
alone for even and odd sizes (outputs and gradients); the whole cascade with random weights
loaded into both from one ``state_dict`` (strict, so keys and shapes are unchanged): float32 eval
mode (outputs at sizes padded as the inference pads them, gradients), float64 train and eval mode
(outputs, every parameter's gradient, BatchNorm running statistics), float32 train mode block by
block; and the shipped weights' prediction on a phantom.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

import chs_net_reference as reference
from napari_covidseg.checkpoint import load_shipped
from napari_covidseg.inference import _forward_logits, predict_volume
from napari_covidseg.models import get_network
from napari_covidseg.models.chs_net import CHSNet
from napari_covidseg.models.spectral_pooling import spectral_lowpass2d, spectral_pool2d

SPECTRAL_SIZES = [(16, 12), (7, 10), (10, 7), (31, 45), (37, 53), (64, 64), (1, 5), (2, 2)]


def assert_close(new: torch.Tensor, old: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """``max |new - old| <= tol * max(1, max |old|)``: float rounding, relative to the output scale."""
    new, old = new.detach(), old.detach()
    scale = max(1.0, float(old.abs().max()))
    error = float((new - old).abs().max())
    assert error <= tol * scale, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def _out_sizes(h: int, w: int) -> set:
    """Output sizes that cover every parity: half (the default), full, odd and even crops, 1x1."""
    return {(max(1, h // 2), max(1, w // 2)), (h, w), (1, 1), (max(1, h - 1), max(1, w - 3)),
            (max(1, (h + 1) // 3), w)}


@pytest.mark.parametrize("size", SPECTRAL_SIZES)
def test_spectral_pool_matches_the_complex_fft_crop(size):
    torch.manual_seed(0)
    x = torch.randn((2, 3) + size, requires_grad=True)
    for out_size in _out_sizes(*size):
        new, old = spectral_pool2d(x, out_size), reference.spectral_pool2d(x, out_size)
        assert new.shape == old.shape
        assert_close(new, old, what=f"output {out_size}")
        weights = torch.randn_like(old)
        (grad_new,) = torch.autograd.grad((new * weights).sum(), x)
        (grad_old,) = torch.autograd.grad((old * weights).sum(), x)
        assert_close(grad_new, grad_old, what=f"gradient {out_size}")


@pytest.mark.parametrize("size", SPECTRAL_SIZES)
@pytest.mark.parametrize("keep", [0.5, 0.3, 0.9, 1.0])
def test_spectral_lowpass_matches_the_complex_fft_mask(size, keep):
    torch.manual_seed(0)
    x = torch.randn((2, 3) + size, requires_grad=True)
    new, old = spectral_lowpass2d(x, keep), reference.spectral_lowpass2d(x, keep)
    assert_close(new, old, what="output")
    weights = torch.randn_like(old)
    (grad_new,) = torch.autograd.grad((new * weights).sum(), x)
    (grad_old,) = torch.autograd.grad((old * weights).sum(), x)
    assert_close(grad_new, grad_old, what="gradient")


def test_spectral_ops_keep_working_after_a_first_call_under_inference_mode():
    """The cached masks and indices are built outside inference mode, so autograd can use them later."""
    with torch.inference_mode():
        spectral_pool2d(torch.randn(1, 2, 22, 18))
        spectral_lowpass2d(torch.randn(1, 2, 22, 18))
    x = torch.randn(1, 2, 22, 18, requires_grad=True)
    (spectral_pool2d(x).sum() + spectral_lowpass2d(x).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _randomise_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that a mix-up between layers shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def _new_and_reference(base: int = 4, seed: int = 0):
    """The fast CHSNet with random weights and the reference CHSNet holding the same state_dict."""
    torch.manual_seed(seed)
    new = CHSNet(base=base)
    _randomise_batch_norms(new, torch.Generator().manual_seed(seed))
    old = reference.CHSNet(base=base)
    old.load_state_dict(new.state_dict(), strict=True)
    return new, old


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (96, 96)])
def test_eval_outputs_match_the_reference(size):
    new, old = _new_and_reference(seed=size[0])
    new.eval(), old.eval()
    x = torch.rand((2, 1) + size)
    with torch.inference_mode():
        logits_new = _forward_logits(new, x, get_network("chs_net").stride)  # padded as the inference pads
        logits_old = _forward_logits(old, x, get_network("chs_net").stride)
        raw_new, raw_old = new(x)["infection_raw_logits"], old(x)["infection_raw_logits"]
    assert logits_new.shape == (2, 2) + size
    assert_close(logits_new, logits_old, what="logits")
    assert_close(raw_new, raw_old, what="raw infection logits")


def _gradients(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple:
    """Logits and ``{name: gradient}`` of the CHS-Net loss at ``x``."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    get_network("chs_net").loss()(out, target)[0].backward()
    return out["logits"].detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_gradients(new: dict, old: dict, tol: float) -> None:
    assert new.keys() == old.keys()
    for name, grad in new.items():
        assert grad is not None, name
        assert_close(grad / old[name].abs().max().clamp_min(1e-12), old[name] / old[name].abs().max().clamp_min(1e-12),
                     tol=tol, what=f"gradient of {name}")


def test_eval_mode_gradients_match_the_reference():
    """Every parameter's gradient through the whole cascade (BatchNorm on running statistics)."""
    new, old = _new_and_reference(seed=3)
    new.eval(), old.eval()
    x = torch.rand(2, 1, 64, 64)
    target = (torch.rand(2, 2, 64, 64) > 0.7).float()
    logits_new, grads_new = _gradients(new, x, target)
    logits_old, grads_old = _gradients(old, x, target)
    assert_close(logits_new, logits_old, what="logits")
    assert_same_gradients(grads_new, grads_old, tol=1e-3)


def _block_pairs():
    """(name, fast block, reference block, input) for each kind of block, random weights."""
    from napari_covidseg.models import chs_net, spectral_pooling

    generator = torch.Generator().manual_seed(5)
    pairs = [
        ("inception", chs_net.InceptionConv(6, 12), reference.InceptionConv(6, 12), (6, 20, 28)),
        ("inception, low-pass first", chs_net.InceptionConv(2, 16), reference.InceptionConv(2, 16), (2, 20, 28)),
        ("residual block", chs_net.ResidualInceptionBlock(6, 12), reference.ResidualInceptionBlock(6, 12), (6, 20, 28)),
        ("odd-size block", chs_net.ResidualInceptionBlock(5, 8), reference.ResidualInceptionBlock(5, 8), (5, 17, 23)),
        ("hybrid pool", spectral_pooling.HybridPool2d(6, 8), reference.HybridPool2d(6, 8), (6, 20, 28)),
    ]
    for name, new, old, shape in pairs:
        _randomise_batch_norms(new, generator)
        old.load_state_dict(new.state_dict(), strict=True)
        yield name, new, old, torch.randn((3,) + shape, generator=generator).relu()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_train_mode_blocks_match_the_reference(layout):
    """Train mode block by block in float32: outputs, input and parameter gradients, running statistics.

    Channels-last is how the blocks run inside the network; contiguous input must work too.

    Block by block because a whole float32 cascade in train mode is chaotic: batch statistics of
    nearly constant channels amplify float rounding (a 1e-7 relative change of the input moves
    its logits by about 1 %, even with the shipped weights), so only shallow pieces can be
    compared to float32 tolerance.  The whole cascade in train mode is compared in float64.
    """
    for name, new, old, x in _block_pairs():
        new.train(), old.train()
        x = x.contiguous(memory_format=layout)
        x_new, x_old = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_new, out_old = new(x_new), old(x_old)
        assert_close(out_new, out_old, what=f"{name} output")
        weights = torch.randn_like(out_old)
        (out_new * weights).sum().backward()
        (out_old * weights).sum().backward()
        assert_close(x_new.grad, x_old.grad, tol=1e-4, what=f"{name} input gradient")
        assert_same_gradients({n: p.grad for n, p in new.named_parameters()},
                              {n: p.grad for n, p in old.named_parameters()}, tol=1e-4)
        old_buffers = dict(old.named_buffers())
        for buffer_name, buffer in new.named_buffers():
            assert_close(buffer.float(), old_buffers[buffer_name].float(), what=f"{name} buffer {buffer_name}")


def test_attention_matches_the_reference():
    from napari_covidseg.models.chs_net import SpectralSpatialDepthAttention

    torch.manual_seed(0)
    new = SpectralSpatialDepthAttention(6, 9)
    old = reference.SpectralSpatialDepthAttention(6, 9)
    old.load_state_dict(new.state_dict(), strict=True)
    x, g = torch.randn(2, 6, 16, 12).relu(), torch.randn(2, 9, 8, 6)
    assert_close(new(x, g), old(x, g), what="attention output")
    x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    assert_close(new(x, g), old(x, g), what="attention output, channels-last")


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (96, 96)])
def test_float64_cascade_matches_the_reference_in_train_and_eval_mode(size):
    """The whole cascade in float64, where train mode is not chaotic: outputs, gradients, statistics.

    In float32 the random-weight cascade in train mode amplifies rounding by about 1e5 (see
    :func:`test_train_mode_blocks_match_the_reference`); in float64 the same amplification leaves
    1e-10, so the two formulations must agree to 1e-8 in both modes.
    """
    new, old = _new_and_reference(seed=size[1])
    new.double(), old.double()
    x = torch.rand((2, 1) + size, dtype=torch.float64)
    target = (torch.rand((2, 2) + size) > 0.7).double()
    for mode in ("train", "eval"):
        new.train(mode == "train"), old.train(mode == "train")
        logits_new, grads_new = _gradients(new, x, target)
        logits_old, grads_old = _gradients(old, x, target)
        assert_close(logits_new, logits_old, tol=1e-8, what=f"{mode} logits")
        assert_same_gradients(grads_new, grads_old, tol=1e-8)
    old_buffers = dict(old.named_buffers())
    for name, buffer in new.named_buffers():
        assert_close(buffer.double(), old_buffers[name].double(), tol=1e-8, what=f"buffer {name}")


@pytest.mark.parametrize("onnx", [False, True])
def test_shipped_weights_give_the_reference_prediction(onnx, monkeypatch):
    """In PyTorch, and in ONNX Runtime (spectral maps as matrix products) where it is installed."""
    from napari_covidseg import inference_settings
    from napari_covidseg.phantom import make_phantom

    if onnx:
        pytest.importorskip("onnxruntime")
    settings = inference_settings.InferenceSettings(channels_last=True)
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "chs_net", settings)
    loaded = load_shipped("chs_net")
    old = reference.CHSNet(**loaded.network_kwargs)
    old.load_state_dict(loaded.model.state_dict(), strict=True)
    phantom = make_phantom(shape=(4, 128, 128))
    spacing = (5.0, 2.5, 2.5)
    old_prob = predict_volume(old, loaded.spec, phantom.ct, spacing, loaded.preprocessing, device="cpu")
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "chs_net", replace(settings, onnx=onnx))
    new_prob = predict_volume(loaded.model, loaded.spec, phantom.ct, spacing, loaded.preprocessing, device="cpu")
    assert float(np.abs(new_prob - old_prob).max()) < (1e-4 if onnx else 1e-5)
    undecided = np.abs(old_prob - 0.5) < 1e-4
    assert np.array_equal((new_prob > 0.5) | undecided, (old_prob > 0.5) | undecided)
    assert (old_prob[0] > 0.5).any(), "the shipped lung net finds lung on the phantom"
    assert ("_covidseg_onnx" in loaded.model.__dict__) == onnx


@pytest.mark.parametrize("momentum", [0.1, None])
def test_joint_batch_norm_equals_one_call_per_layer(momentum):
    """Same outputs, gradients and running statistics as calling each layer on its channels."""
    from napari_covidseg.models.joint_batch_norm import joint_batch_norm

    generator = torch.Generator().manual_seed(0)
    separate = [torch.nn.BatchNorm2d(n, momentum=momentum) for n in (4, 3, 5)]
    joined = [torch.nn.BatchNorm2d(n, momentum=momentum) for n in (4, 3, 5)]
    for norm in separate:
        _randomise_batch_norms(norm, generator)
    for a, b in zip(joined, separate):
        a.load_state_dict(b.state_dict())
    for training in (True, True, False):
        x = torch.randn(3, 12, 9, 7, generator=generator).contiguous(memory_format=torch.channels_last)
        x_separate, x_joined = x.clone().requires_grad_(), x.clone().requires_grad_()
        for norm in separate + joined:
            norm.train(training)
        out_separate = torch.cat([n(p) for n, p in zip(separate, x_separate.split([4, 3, 5], dim=1))], dim=1)
        out_joined = joint_batch_norm(x_joined, joined)
        assert_close(out_joined, out_separate, what="output")
        weights = torch.randn_like(out_separate)
        (out_separate * weights).sum().backward()
        (out_joined * weights).sum().backward()
        assert_close(x_joined.grad, x_separate.grad, what="input gradient")
        for a, b in zip(joined, separate):
            for name, value in b.state_dict().items():
                assert_close(a.state_dict()[name].double(), value.double(), what=name)
            assert_close(a.weight.grad, b.weight.grad, what="weight gradient")
