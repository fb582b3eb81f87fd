"""CHS-Net's spectral maps as matrix products (the form its ONNX graph holds) against the FFT code."""

import numpy as np
import pytest
import torch

import chs_net_reference as reference
from napari_covidseg.models import get_network, spectral_matrices
from napari_covidseg.models.spectral_pooling import spectral_lowpass2d, spectral_pool2d
from napari_covidseg.preprocessing import Preprocessing
from network_helpers import loaded_network

PREP = Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax", inplane_size=(48, 64))
SIZES = [(16, 16), (15, 12), (7, 9), (2, 3), (64, 48)]


def _close(new: torch.Tensor, old: torch.Tensor, tol: float = 1e-5) -> None:
    assert new.shape == old.shape
    scale = max(1.0, float(old.abs().max()))
    assert float((new - old).abs().max()) <= tol * scale


@pytest.mark.parametrize("size", SIZES)
def test_pooling_as_matrix_products_matches_the_complex_fft_crop(size):
    x = torch.randn((2, 3) + size, generator=torch.Generator().manual_seed(0))
    h, w = size
    for out_size in {(max(1, h // 2), max(1, w // 2)), (h, w), (1, 1), (max(1, h - 1), max(1, w - 3))}:
        _close(spectral_matrices.apply(x, "pool", out_size), reference.spectral_pool2d(x, out_size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("keep", [0.5, 0.3, 1.0])
def test_lowpass_as_matrix_products_matches_the_complex_fft_mask(size, keep):
    x = torch.randn((2, 3) + size, generator=torch.Generator().manual_seed(1))
    band = tuple(max(1, int(round(n * keep))) for n in size)
    _close(spectral_matrices.apply(x, "lowpass", band), reference.spectral_lowpass2d(x, keep))


def test_factors_have_the_rank_of_the_band_not_of_the_map():
    """The low-pass keeping half of 256 frequencies: 129 real columns (DC, 63 pairs, the unpaired
    Nyquist), 2 imaginary ones; the cost is what the module docstring counts."""
    left, right, sign = spectral_matrices.axis_factors(spectral_matrices.lowpass_operator(256, 128))
    assert left.shape == right.shape == (256, 131) and (sign > 0).sum() == 129
    odd_band = spectral_matrices.axis_factors(spectral_matrices.lowpass_operator(255, 127))[2]
    assert (odd_band < 0).sum() == 0  # an odd band is point-symmetric: no imaginary part


def test_chs_net_forward_in_export_form_gives_its_logits(monkeypatch):
    """What a trace records (matrix products, plain 1x1 convolutions and max pooling) computes
    what the network computes, channels-last or not."""
    torch.manual_seed(0)
    model = get_network("chs_net").create(base=4).eval()
    x = torch.rand(2, 1, 48, 40)
    with torch.no_grad():
        expected = model(x)["logits"]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        _close(model(x)["logits"], expected, tol=1e-4)
        model.to(memory_format=torch.channels_last)
        _close(model(x)["logits"], expected, tol=1e-4)


def test_spectral_functions_switch_to_matrix_products_only_while_exporting(monkeypatch):
    calls = []
    original = spectral_matrices.apply
    monkeypatch.setattr(spectral_matrices, "apply", lambda *args: calls.append(args[1]) or original(*args))
    x = torch.randn(1, 2, 16, 16)
    spectral_pool2d(x), spectral_lowpass2d(x)
    assert calls == []
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    spectral_pool2d(x), spectral_lowpass2d(x)
    assert calls == ["pool", "lowpass"]


def test_chs_net_runs_in_onnx_runtime_with_one_graph_per_size():
    pytest.importorskip("onnxruntime")
    from napari_covidseg.onnx_backend import OnnxRunner, _Logits

    torch.manual_seed(0)
    model = get_network("chs_net").create(base=4).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    runner = OnnxRunner(model, stride=16)
    for shape in [(2, 1, 64, 48), (1, 1, 64, 48), (1, 1, 80, 48)]:
        x = torch.rand(shape)
        with torch.no_grad():
            got, expected = runner(x), _Logits(model)(x)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)
    assert not runner.failed and not runner.shape_free
    assert sorted(runner.graphs) == [(1, 64, 48), (1, 80, 48)]  # a batch of 2 and of 1 share the export
    assert sorted(key[0] for key in runner.sessions) == [(1, 1, 64, 48), (1, 1, 80, 48), (2, 1, 64, 48)]
    # traced and checked at each full size, never on a small crop first
    assert {tuple(int(n) for n in s[2:]) for s in seen} == {(64, 48), (80, 48)}


def _chs_net_loaded(monkeypatch, onnx: bool = True):
    from napari_covidseg import inference_settings

    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "chs_net",
                        inference_settings.InferenceSettings(channels_last=True, onnx=onnx))
    return loaded_network("chs_net", PREP, base=4)


def test_prepare_network_builds_the_session_the_segmentation_then_uses(monkeypatch):
    """The export at full size happens before the CT is there (its transient memory does not stack
    on the CT's), and the segmentation runs the session it built: no second export."""
    pytest.importorskip("onnxruntime")
    from napari_covidseg.inference import prepare_network, segment_volume

    loaded = _chs_net_loaded(monkeypatch)
    assert prepare_network(loaded, "cpu")
    runner = loaded.model.__dict__["_covidseg_onnx"]
    (session,) = runner.sessions.values()
    exports = []
    monkeypatch.setattr(runner, "_export", lambda *a, **k: exports.append(a))
    ct = np.random.default_rng(0).uniform(-1100, 200, size=(3, 40, 50)).astype(np.float32)
    result = segment_volume(loaded, ct, (1, 1, 1), device="cpu")
    assert exports == [] and list(runner.sessions.values()) == [session] and result.lung.shape == ct.shape


def test_prepare_network_does_nothing_where_nothing_is_exported_at_full_size(monkeypatch):
    from napari_covidseg.inference import prepare_network

    assert not prepare_network(_chs_net_loaded(monkeypatch, onnx=False), "cpu")
    loaded = loaded_network("unet", PREP, base=4, depth=2)
    assert not prepare_network(loaded, "cpu") and "_covidseg_onnx" not in loaded.model.__dict__
