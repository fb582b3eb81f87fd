"""Per-network CPU settings: same results in every memory format, an opt-in compiled path that
falls back cleanly, and the OpenMP wait policy the package sets."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_covidseg import inference_settings
from napari_covidseg.inference import segment_volume
from napari_covidseg.inference_settings import InferenceSettings, prepare_model, settings_for
from napari_covidseg.models import get_network
from napari_covidseg.preprocessing import Preprocessing
from network_helpers import loaded_network

PREP = Preprocessing(hu_min=-1250, hu_max=250, normalisation="minmax", inplane_size=(32, 32))


def _loaded(network, **kwargs):
    return loaded_network(network, PREP, **kwargs)


def _ct():
    return np.random.default_rng(0).uniform(-1100, 200, size=(6, 40, 36)).astype(np.float32)


def _layouts(model):
    return [(p.is_contiguous(), p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last))
            for p in model.parameters()]


@pytest.mark.parametrize("network,kwargs", [("unet", {"base": 4, "depth": 2}), ("ms_unet", {"base": 4, "mid": 8}),
                                            ("msa_cpp_unet", {"base": 4}), ("chs_net", {"base": 4})])
def test_memory_format_does_not_change_the_result(network, kwargs, monkeypatch):
    loaded = _loaded(network, **kwargs)
    layouts = _layouts(loaded.model)
    results = {}
    for channels_last in (False, True):
        monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, network, InferenceSettings(channels_last=channels_last))
        results[channels_last] = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True,
                                                probability_dtype="float32")
    np.testing.assert_allclose(results[True].probabilities, results[False].probabilities, atol=1e-4)
    assert _layouts(loaded.model) == layouts  # the caller's model is left as it was


def test_every_network_has_a_measured_setting():
    from napari_covidseg.models import network_names

    assert set(inference_settings.NETWORK_SETTINGS) == set(network_names())
    assert settings_for("unet", torch.device("cpu"), compile=True).compile
    assert not settings_for("unet", torch.device("cpu"), compile=False).compile


def test_default_batch_size_is_one_slice_on_the_cpu_and_a_few_on_a_gpu(monkeypatch):
    for network in ("unet", "ms_unet", "msa_cpp_unet", "chs_net"):
        assert settings_for(network, torch.device("cpu")).batch_size == 1
        assert settings_for(network, torch.device("cuda")).batch_size == inference_settings.GPU_BATCH_SIZE
    loaded = _loaded("unet", base=4, depth=2)
    sizes = []
    monkeypatch.setattr("napari_covidseg.inference.resize_inplane", lambda x, size: sizes.append(x.shape[0]) or
                        torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))
    segment_volume(loaded, _ct(), (1, 1, 1), device="cpu")
    assert set(sizes) == {1}  # six slices, one per forward pass
    sizes.clear()
    segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", batch_size=4)
    assert sizes[0] == 4  # a caller's choice wins


def test_compile_falls_back_to_the_plain_model_with_one_warning(monkeypatch):
    loaded = _loaded("unet", base=4, depth=2)
    expected = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", compile=False)

    def broken(*args, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile is not possible here.*no C\\+\\+ compiler"):
        got = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", compile=True)
    np.testing.assert_array_equal(got.lung, expected.lung)
    assert prepare_model(loaded.model, torch.device("cpu"), InferenceSettings(compile=True), 2) is loaded.model
    assert "_covidseg_compiled" not in loaded.model.__dict__ and "_covidseg_compiled" not in dict(loaded.model.named_modules())


def test_compiled_callable_is_kept_with_the_model_and_reused(monkeypatch):
    model = _loaded("unet", base=4, depth=2).model
    made = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: made.append(m) or m)
    first = prepare_model(model, torch.device("cpu"), InferenceSettings(compile=True), 2)
    second = prepare_model(model, torch.device("cpu"), InferenceSettings(compile=True), 2)
    assert first is second and made == [model]
    assert set(model.state_dict()) == set(get_network("unet").create(base=4, depth=2).state_dict())


@pytest.mark.parametrize("preset,torch_first,expected", [(None, False, "PASSIVE"), ("ACTIVE", False, "ACTIVE"),
                                                         (None, True, None)])
def test_openmp_wait_policy(preset, torch_first, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import torch\n" if torch_first else "") + "import os, napari_covidseg; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(expected)


# --- ONNX Runtime (optional) -------------------------------------------------------------------
def test_onnx_runtime_gives_the_pytorch_result_and_follows_weight_changes(monkeypatch):
    pytest.importorskip("onnxruntime")
    loaded = _loaded("unet", base=4, depth=2)
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=False))
    expected = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=True))
    got = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    runner = loaded.model.__dict__["_covidseg_onnx"]
    assert runner.sessions and not runner.failed
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4)
    with torch.no_grad():  # a training step changes the weights: the next prediction is exported anew
        list(loaded.model.parameters())[-1].add_(1.0)  # the output bias
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=False))
    changed = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=True))
    again = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    np.testing.assert_allclose(again.probabilities, changed.probabilities, atol=1e-4)
    assert np.abs(changed.probabilities - expected.probabilities).max() > 1e-3


def test_ms_unet_exports_to_onnx_runtime_and_gives_the_pytorch_masks(monkeypatch):
    """SIM's 1.5x -> 1x adaptive pooling has no ONNX operator: the export writes it as gathers."""
    pytest.importorskip("onnxruntime")
    loaded = _loaded("ms_unet", base=4, mid=8)
    ct = np.random.default_rng(1).uniform(-1100, 200, size=(3, 40, 36)).astype(np.float32)
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "ms_unet", InferenceSettings(onnx=False))
    expected = segment_volume(loaded, ct, (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "ms_unet", InferenceSettings(onnx=True))
    got = segment_volume(loaded, ct, (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")
    runner = loaded.model.__dict__["_covidseg_onnx"]
    assert runner.sessions and not runner.failed
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4)


def test_onnx_graph_traced_on_a_small_crop_serves_every_size_without_a_full_size_pytorch_forward():
    """The export and its checks run PyTorch on crops only (the memory of a full-size forward is
    what the small trace saves); the one graph then serves other sizes with the same remainders."""
    pytest.importorskip("onnxruntime")
    from napari_covidseg.onnx_backend import OnnxRunner, _Logits

    model = _loaded("unet", base=4, depth=2).model
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    runner = OnnxRunner(model, stride=4)
    x = torch.randn(2, 1, 40, 36)
    with torch.no_grad():
        got = runner(x)
    assert runner.traced_shape(x.shape) == (1, 8, 8) and runner.shape_free
    assert seen == [(1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 12, 12)]  # the trace, then the checks at two sizes
    for shape in [(2, 1, 40, 36), (3, 1, 52, 44)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, expected = runner(x), _Logits(model)(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # one export for every size; a session per input shape, every dimension fixed (shapes folded)
    assert len(runner.graphs) == 1 and sorted(key[0] for key in runner.sessions) == [(2, 1, 40, 36), (3, 1, 52, 44)]
    assert [s.get_inputs()[0].shape for s in runner.sessions.values()] == [[2, 1, 40, 36], [3, 1, 52, 44]]
    # neither of ONNX Runtime's memory plans, which hold a forward pass's maps beyond their last use
    # (onnx_backend's docstring; chs_net's slice: +136 MB with buffer reuse, +51 MB without)
    options = next(iter(runner.sessions.values())).get_session_options()
    assert not options.enable_mem_pattern and not options.enable_mem_reuse


class _HoldsASize(torch.nn.Module):
    """Resizes to sizes computed in Python: a trace holds them as constants."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        half = F.interpolate(self.conv(x), size=[int(n) // 2 for n in x.shape[2:]], mode="bilinear")
        return {"logits": F.interpolate(half, size=[int(n) for n in x.shape[2:]], mode="bilinear")}


@pytest.mark.parametrize("network", ["ms_unet", "holds_a_size"])
def test_a_graph_that_holds_a_size_as_a_constant_is_exported_per_shape(network):
    """A graph traced with a size as a constant fails the check at a second size and is exported
    per input shape, still giving PyTorch's logits.  ms_unet did (its 0.5x and 1.5x inputs were
    resized to sizes computed in Python, its 1.5x pooling exported as gathers) and no longer does."""
    pytest.importorskip("onnxruntime")
    from napari_covidseg.onnx_backend import OnnxRunner, _Logits

    model = _loaded("ms_unet", base=4, mid=8).model if network == "ms_unet" else _HoldsASize().eval()
    runner = OnnxRunner(model, stride=32)
    for shape in [(1, 1, 160, 192), (1, 1, 224, 192)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, expected = runner(x), _Logits(model)(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not runner.failed and runner.shape_free == (network == "ms_unet")
    traced = [(1, 64, 64)] if network == "ms_unet" else [(1, 160, 192), (1, 224, 192)]
    assert sorted(runner.graphs) == traced and len(runner.sessions) == 2


class _ExportsAnotherForm(torch.nn.Module):
    """A network whose ``export_form`` is honest (the same logits) or not."""

    def __init__(self, honest: bool):
        super().__init__()
        self.conv, self.honest, self.exported = torch.nn.Conv2d(1, 2, 3, padding=1), honest, 0

    def export_form(self):
        self.exported += 1
        return self if self.honest else torch.nn.Sequential(self.conv, torch.nn.ReLU())

    def forward(self, x):
        return {"logits": self.conv(x)}


@pytest.mark.parametrize("honest", [True, False])
def test_onnx_runtime_runs_a_network_s_export_form_checked_against_the_network(honest):
    """msa_cpp_unet exports a zero-padded copy of itself: the runner exports what ``export_form``
    returns, and a form whose logits differ from the network's is refused (PyTorch from then on)."""
    pytest.importorskip("onnxruntime")
    from napari_covidseg.onnx_backend import OnnxRunner

    model = _ExportsAnotherForm(honest).eval()
    runner = OnnxRunner(model, stride=4)
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = runner(x)  # PyTorch's output (a dict) after a refusal, as the network's own call gives
        got = got["logits"] if isinstance(got, dict) else got
        torch.testing.assert_close(got, model(x)["logits"], atol=1e-5, rtol=1e-5)
    # the dishonest form fails the small trace's check, then the per-shape export's
    assert model.exported == (1 if honest else 2) and runner.failed == (not honest)
    assert len([w for w in caught if "ONNX Runtime is not used" in str(w.message)]) == (0 if honest else 1)


def test_onnx_export_failure_falls_back_to_pytorch_with_one_warning(monkeypatch):
    pytest.importorskip("onnxruntime")
    loaded = _loaded("unet", base=4, depth=2)
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=False))
    expected = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu")

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fft_rfft2' to ONNX is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "unet", InferenceSettings(onnx=True))
    with pytest.warns(RuntimeWarning, match="ONNX Runtime is not used for this network.*fft_rfft2"):
        got = segment_volume(loaded, _ct(), (1, 1, 1), device="cpu")
    np.testing.assert_array_equal(got.lung, expected.lung)
    assert loaded.model.__dict__["_covidseg_onnx"].failed


def test_onnx_is_not_used_without_onnx_runtime_or_off_the_cpu(monkeypatch):
    from napari_covidseg import onnx_backend

    monkeypatch.setattr(onnx_backend, "available", lambda: False)
    assert not settings_for("qchc_unet3d", torch.device("cpu")).onnx
    monkeypatch.setattr(onnx_backend, "available", lambda: True)
    assert settings_for("qchc_unet3d", torch.device("cpu"), compile=False).onnx
    assert not settings_for("qchc_unet3d", torch.device("cuda"), compile=False).onnx
    assert not settings_for("qchc_unet3d", torch.device("cpu"), compile=True).onnx


# --- BatchNorm folded into convolutions ------------------------------------------------------
def _randomise_batch_norms(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.running_mean.normal_(0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.normal_(1, 0.2, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)


def test_folded_batch_norms_give_the_pytorch_result_and_follow_weight_changes(monkeypatch):
    loaded = _loaded("ms_unet", base=4, mid=8)
    _randomise_batch_norms(loaded.model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    layouts = _layouts(loaded.model)

    def run(fold):
        monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "ms_unet",
                            InferenceSettings(channels_last=True, fold_batch_norm=fold))
        return segment_volume(loaded, _ct(), (1, 1, 1), device="cpu", probabilities=True, probability_dtype="float32")

    expected, got = run(False), run(True)
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4)
    runner = loaded.model.__dict__["_covidseg_folded"]
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert n_bn(runner.folded) == 0 < n_bn(loaded.model)  # the copy is folded, the model is not
    state = loaded.model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert _layouts(loaded.model) == layouts
    with torch.no_grad():  # a training step: the next prediction folds the new weights
        next(m for m in loaded.model.modules() if isinstance(m, torch.nn.BatchNorm2d)).bias.add_(0.5)
    changed, again = run(False), run(True)
    np.testing.assert_allclose(again.probabilities, changed.probabilities, atol=1e-4)
    assert np.abs(changed.probabilities - expected.probabilities).max() > 1e-3


def test_batch_norms_are_folded_on_the_cpu_in_pytorch_only(monkeypatch):
    from napari_covidseg import onnx_backend
    from napari_covidseg.bn_folding import fold_batch_norms

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(onnx_backend, "available", lambda: False)
    assert settings_for("ms_unet", cpu, compile=False).fold_batch_norm
    assert not settings_for("ms_unet", cpu, compile=True).fold_batch_norm
    assert not settings_for("ms_unet", gpu, compile=False).fold_batch_norm
    monkeypatch.setitem(inference_settings.NETWORK_SETTINGS, "ms_unet",
                        InferenceSettings(channels_last=True, fold_batch_norm=True, onnx=True))
    monkeypatch.setattr(onnx_backend, "available", lambda: True)  # ONNX Runtime runs its own export, unfolded
    assert settings_for("ms_unet", cpu, compile=False).onnx and not settings_for("ms_unet", cpu, compile=False).fold_batch_norm
    block = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(3))  # a BatchNorm after no convolution stays
    _randomise_batch_norms(block)
    folded = fold_batch_norms(block.eval())
    assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity", "ReLU", "BatchNorm2d"]
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(x), atol=1e-5, rtol=1e-5)
    assert isinstance(block[1], torch.nn.BatchNorm2d)


def test_weights_watch_sees_in_place_changes_and_after_a_relist_replaced_parameters():
    from napari_covidseg.onnx_backend import WeightsWatch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    watch = WeightsWatch(model)
    before = watch.version()
    assert watch.version() == before
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a training step
    changed = watch.version()
    assert changed != before
    model[0].bias = torch.nn.Parameter(torch.zeros(2))  # replaced: seen once the tensors are listed again
    watch.relist()
    assert watch.version() != changed


def test_onnx_runner_keeps_the_most_recent_sessions_and_one_export():
    """Every session holds its own arena: the runner keeps the last MAX_SESSIONS shapes' sessions,
    and a shape seen again gets a new session from the kept export, not a new export."""
    pytest.importorskip("onnxruntime")
    from napari_covidseg import onnx_backend
    from napari_covidseg.onnx_backend import OnnxRunner, _Logits

    model = _loaded("unet", base=4, depth=2).model
    runner = OnnxRunner(model, stride=4)
    exports = []
    export = runner._export
    runner._export = lambda *a, **k: exports.append(a[0].shape) or export(*a, **k)
    shapes = [(1, 1, 40, 36), (1, 1, 44, 36), (1, 1, 48, 36), (1, 1, 52, 36), (1, 1, 40, 36)]
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), _Logits(model)(x), atol=1e-4, rtol=1e-4)
    assert onnx_backend.MAX_SESSIONS == 3 and len(exports) == 1  # traced once, on a crop
    assert [key[0] for key in runner.sessions] == shapes[-3:]
