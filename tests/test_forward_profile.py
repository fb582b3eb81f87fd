"""benchmarks/forward_profile.py: convolutions classified and counted as ONNX Runtime runs them,
profiles summed per forward pass, the bound's arithmetic."""

import io

import pytest
import torch
import torch.nn as nn

from benchmarks import forward_profile as fp


def _args(op, x, w=None, out=None):
    shapes = [{"float": x}] + ([{"float": w}] if w is not None else [])
    return {"op_name": op, "input_type_shape": shapes, "output_type_shape": [{"float": out}]}


def test_conv_kind_names_each_kind_and_counts_the_flops_it_runs():
    assert fp.conv_kind(_args("Conv", [1, 16, 8, 8], [32, 16, 3, 3], [1, 32, 8, 8])) == (
        "dense kxk", 2.0 * 32 * 64 * 16 * 9)
    assert fp.conv_kind(_args("Conv", [1, 16, 8, 8], [16, 16, 1, 1], [1, 16, 8, 8])) == ("1x1", 2.0 * 16 * 64 * 16)
    assert fp.conv_kind(_args("Conv", [1, 16, 8, 8], [16, 1, 5, 5], [1, 16, 8, 8])) == ("depthwise", 2.0 * 16 * 64 * 25)
    # a first layer on one channel is a dense convolution, not a depthwise one
    assert fp.conv_kind(_args("Conv", [1, 1, 8, 8], [16, 1, 3, 3], [1, 16, 8, 8]))[0] == "dense kxk"
    # transposed: ONNX Runtime lists no weight; 2x2 stride 2, each output from one input pixel
    assert fp.conv_kind(_args("ConvTranspose", [1, 32, 4, 4], None, [1, 16, 8, 8])) == (
        "transposed", 2.0 * 32 * 16 * 64)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.pointwise(nn.functional.max_pool2d(self.depthwise(x), 3, 1, 1))


def test_kernel_times_sums_one_pass_by_operator_and_kind(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Tiny().eval(), (torch.zeros(1, 1, 32, 32),), buffer, input_names=["x"], dynamo=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ops, kinds = fp.kernel_times(buffer.getvalue(), (), (1, 1, 32, 32), runs=3, folder=tmp_path)
    assert ops["MaxPool"]["nodes"] == 1  # per pass, not per profiled run
    assert sum(r["nodes"] for op, r in ops.items() if op in fp.CONVOLUTIONS) == 3
    assert {kind: r["nodes"] for kind, r in kinds.items()} == {"dense kxk": 1, "depthwise": 1, "1x1": 1}
    assert kinds["depthwise"]["gflop"] == pytest.approx(2 * 16 * 32 * 32 * 9 / 1e9)
    assert all(r["ms"] > 0 for r in ops.values())
    assert list((tmp_path / "cwd").iterdir()) == []  # the profile goes to the given folder, not the working one


def test_fft_bound_scales_the_matrix_products_only():
    row = {"gflop": 2.0, "best_ms": 100.0, "ops": {"MatMul": {"ms": 40.0}, "Concat": {"ms": 10.0}}}
    spectral = [{"fft_ms": 1.0, "matrices_ms": 4.0}, {"fft_ms": 3.0, "matrices_ms": 4.0}]
    bound = fp.with_fft_spectral_maps(row, spectral, peak=100.0)
    assert bound["ratio"] == pytest.approx(0.5)
    assert bound["best_ms"] == pytest.approx(80.0)  # 40 ms of matrix products at half the time
    assert bound["best_pct_of_peak"] == pytest.approx(100.0 * 2.0 / 0.080 / 100.0)
