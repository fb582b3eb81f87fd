"""Optional ONNX Runtime backend for CPU inference (``pip install napari-covidseg[onnx]``).

Where ONNX Runtime is installed and a network's setting asks for it
(:data:`napari_covidseg.inference_settings.NETWORK_SETTINGS`, chosen by
``python -m benchmarks.speed``), the network is exported to ONNX on first use and run by ONNX
Runtime's CPU provider instead of PyTorch.  Without ONNX Runtime nothing changes.

* An export is made per input shape (the batch dimension is dynamic) and checked at once against
  PyTorch on the batch that triggered it: logits that differ by more than 1e-3 of their range
  (float rounding is far below) make the model run in PyTorch from then on, with one warning.
  So does any export or session error (an op ONNX cannot express, e.g. FFTs).
* The weights are exported as they are at that moment: a model whose parameters changed since
  (the trainer validating between epochs) is exported again.
* ONNX Runtime uses as many threads as PyTorch (``torch.get_num_threads()``).
* Memory: the session runs without ONNX Runtime's memory pattern (``enable_mem_pattern``): with
  it, the second run of a shape plans one block for all its intermediates *next to* what the
  arena already holds from the first run, and the arena never gives memory back, so the
  network's working memory is held about twice (measured: +100 MB for ``unet`` at a batch of 4
  256 x 256 slices, +185 MB for ``qchc_unet3d`` at one 80 x 128 x 128 patch), for no speed gain on
  the CPU (same time per run, within noise).  The arena itself stays on: without it every run
  maps its memory afresh and runs 25-40 % slower.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

TOLERANCE = 1e-3


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class _Logits(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out["logits"] if isinstance(out, dict) else out


def weights_version(model: nn.Module) -> Tuple:
    """Changes whenever a parameter or buffer is modified in place or replaced."""
    return tuple((t.data_ptr(), t._version) for t in list(model.parameters()) + list(model.buffers()))


class OnnxRunner:
    """Callable like the model (returns its logits), through ONNX Runtime; see the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.failed = False
        self.version = None
        self.sessions: Dict[Tuple, object] = {}

    def __call__(self, x: torch.Tensor):
        if self.failed:
            return self.model(x)
        version = weights_version(self.model)
        if version != self.version:
            self.sessions, self.version = {}, version
        key = (tuple(x.shape[1:]), torch.get_num_threads())
        if key not in self.sessions:
            try:
                self.sessions[key] = self._export_and_check(x)
            except Exception as exc:  # export, session or agreement: PyTorch from now on
                self.failed = True
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                warnings.warn(f"ONNX Runtime is not used for this network ({type(exc).__name__}: {first_line[:200]}); "
                              "running it in PyTorch", RuntimeWarning, stacklevel=2)
                return self.model(x)
        return torch.from_numpy(self.sessions[key].run(None, {"x": _numpy(x)})[0])

    def _export_and_check(self, x: torch.Tensor):
        import onnxruntime as ort

        wrapped = _Logits(self.model).eval()
        buffer = io.BytesIO()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            torch.onnx.export(wrapped, (torch.zeros(tuple(x.shape)),), buffer, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
            expected = wrapped(x.clone()).numpy()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.enable_mem_pattern = False  # see the module docstring: the working memory held once, not twice
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": _numpy(x)})[0]
        scale = max(1.0, float(np.abs(expected).max()))
        difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not difference <= TOLERANCE * scale:
            raise ValueError(f"its logits differ from PyTorch's by {difference:.3g}")
        return session


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
