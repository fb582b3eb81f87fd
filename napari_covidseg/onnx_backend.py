"""Optional ONNX Runtime backend for CPU inference (``pip install napari-covidseg[onnx]``).

Where ONNX Runtime is installed and a network's setting asks for it
(:data:`napari_covidseg.inference_settings.NETWORK_SETTINGS`, chosen by
``python -m benchmarks.speed``), the network is exported to ONNX on first use and run by ONNX
Runtime's CPU provider instead of PyTorch.  Without ONNX Runtime nothing changes.

* The graph is traced on a small crop of the first input and exported with every dimension but
  the channels dynamic, so one export serves every slice, patch and batch size: each spatial size
  above three network strides is traced at two strides plus its remainder (a 128-voxel side at
  stride 16 is traced at 32), so branches on divisibility take the same way.  Tracing and checking
  at the full size would run PyTorch's forward on it twice (measured: a 80 x 128 x 128
  ``qchc_unet3d`` patch costs +500 MB that way, +310 MB traced small; same speed).
* Each input shape then runs in a session of that one export with every dimension fixed to the
  shape (ONNX Runtime's free-dimension overrides), so ONNX Runtime folds the graph's shape
  arithmetic (``Shape``, ``Gather``, ``Concat`` of sizes) into constants once instead of running
  it on every call.  Measured: ``msa_cpp_unet`` 1 183 -> 521 nodes, forward 2-4 % faster;
  ``chs_net`` 1 390 -> 1 120 nodes, 3-7 % faster; memory at 300 slices: ``qchc_unet3d`` 439 ->
  411 MB, ``chs_net`` 373 -> 357 MB, ``unet`` 317 -> 323 MB (the export's bytes are now kept for
  the next shape).  A 2D CT runs one shape (a slice at a time on the CPU), a 3D one its patch;
  the runner keeps the sessions of the last :data:`MAX_SESSIONS` shapes (each has its own arena).
* The export is checked at once against PyTorch on crops of the input at the traced size and at
  one stride more per traced side: a graph that holds a size as a constant (``ms_unet``'s
  adaptive pooling is written as gathers with fixed indices) fails there and the network is
  exported per input shape from then on, checked on the full input that triggered it.  Logits
  that differ by more than 1e-3 of their range (float rounding is far below) at full size make
  the model run in PyTorch from then on, with one warning; so does any export or session error
  (an op ONNX cannot express, e.g. FFTs).
* A network with ``onnx_graph_per_size = True`` (``chs_net``: its spectral maps are exported as
  matrix products of the traced size) is exported per input shape from the start, with no
  attempt at a small crop.
* A network with an ``export_form()`` method is exported as the module it returns (e.g.
  ``msa_cpp_unet``'s zero-padded widths) and checked against the network itself.
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
* Nor with ONNX Runtime's buffer reuse (``enable_mem_reuse``): its planner hands the buffers of
  finished maps on to later maps, and the buffers it shares that way are held far beyond any
  map's last use, so most of a forward pass's maps end up held at once.  Measured on one 256 x
  256 slice of the shipped ``chs_net`` (two cascaded U-Nets, 1 400 nodes), every buffer mapped
  and unmapped on its own so that resident memory is what is held: 127 MB held with reuse, 43 MB
  without (the maps alive at once by their last use: at most 23 MB); with the arena, +136 MB
  against +51 MB; same time per run.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import io
import warnings
from collections import OrderedDict
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

TOLERANCE = 1e-3
#: sessions kept per network, the most recently used: each holds its own memory arena (a 3D
#: network's patch: ~300 MB), and a CT runs one shape (two with a batch size that leaves a remainder)
MAX_SESSIONS = 3


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class _Logits(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out["logits"] if isinstance(out, dict) else out


class WeightsWatch:
    """Whether a model's weights changed since the last look, at a cost per look that does not walk
    the module tree (listing ``msa_cpp_unet``'s 380 tensors took 4.6 ms, 5 % of its forward pass).

    ``version()`` changes whenever a listed parameter or buffer is modified in place or given new
    data; ``relist()`` lists them again, which catches a parameter replaced by another object.
    :func:`napari_covidseg.inference_settings.prepare_model` relists once per volume, so a model
    trained between two predictions is always seen as changed.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.relist()

    def relist(self) -> None:
        self.tensors = list(self.model.parameters()) + list(self.model.buffers())

    def version(self) -> Tuple:
        return tuple((t.data_ptr(), t._version) for t in self.tensors)


class OnnxRunner:
    """Callable like the model (returns its logits), through ONNX Runtime; see the module docstring.
    ``stride``: a multiple of the network's stride (sizes keep their remainder modulo it when traced)."""

    def __init__(self, model: nn.Module, stride: int = 16):
        self.model = model
        self.stride = int(stride)
        self.failed = False
        # False once a graph traced at a small size disagreed at another, or where the network says
        # its graph holds its size
        self.shape_free = not getattr(model, "onnx_graph_per_size", False)
        self.weights, self.version = WeightsWatch(model), None
        #: traced (channels, *sizes) -> (checked ONNX model, its dynamic input axes and their names)
        self.graphs: Dict[Tuple, Tuple[bytes, Tuple[Tuple[int, str], ...]]] = {}
        #: (input shape, threads) -> session of the graph with every dimension fixed to that shape,
        #: the last MAX_SESSIONS used (the oldest is let go, with its arena, when another is added)
        self.sessions: "OrderedDict[Tuple, object]" = OrderedDict()

    def __call__(self, x: torch.Tensor):
        if self.failed:
            return self.model(x)
        version = self.weights.version()
        if version != self.version:
            self.graphs, self.sessions, self.version = {}, OrderedDict(), version
        key = self._key(x)
        if key not in self.sessions:
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)
            try:
                self._add_session(x)
            except Exception as exc:  # export, session or agreement: PyTorch from now on
                self.failed = True
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                warnings.warn(f"ONNX Runtime is not used for this network ({type(exc).__name__}: {first_line[:200]}); "
                              "running it in PyTorch", RuntimeWarning, stacklevel=2)
                return self.model(x)
            finally:
                return_freed_heap()
        self.sessions.move_to_end(key)
        return torch.from_numpy(self.sessions[key].run(None, {"x": _numpy(x)})[0])

    def traced_shape(self, shape) -> Tuple[int, ...]:
        """(channels, *sizes) the graph for an input of ``shape`` is traced at."""
        if not self.shape_free:
            return tuple(shape[1:])
        s = self.stride
        return (shape[1],) + tuple(n if n <= 3 * s else 2 * s + n % s for n in shape[2:])

    def _key(self, x: torch.Tensor) -> Tuple:
        return tuple(x.shape), torch.get_num_threads()

    def _add_session(self, x: torch.Tensor) -> None:
        """The session for ``x``'s shape, from the graph its traced shape has (exported and checked
        first where there is none yet)."""
        traced = self.traced_shape(x.shape)
        if traced not in self.graphs and traced != tuple(x.shape[1:]):
            checked = tuple(t + self.stride if t != n else n for t, n in zip(traced[1:], x.shape[2:]))
            graph = self._export(_crop(x[:1], traced[1:]), spatial_dynamic=True)
            session = _session(*graph)
            try:
                for size in (traced[1:], checked):
                    _check(session, self.model, _crop(x[:1], size))
                self.graphs[traced] = graph
            except Exception:  # a size held as a constant: export per input shape from now on
                self.shape_free = False
                traced = tuple(x.shape[1:])
            del session
        if traced in self.graphs:
            self.sessions[self._key(x)] = _session(*self.graphs[traced], shape=x.shape)
            return
        graph = self._export(x, spatial_dynamic=False)
        session = _session(*graph, shape=x.shape)
        _check(session, self.model, x)
        self.graphs[traced], self.sessions[self._key(x)] = graph, session

    def _export(self, x: torch.Tensor, spatial_dynamic: bool) -> Tuple[bytes, Tuple[Tuple[int, str], ...]]:
        """The ONNX model of the network traced on ``x`` and its dynamic input axes with their names
        (the batch; with ``spatial_dynamic``, the sizes too)."""
        axes = range(x.ndim) if spatial_dynamic else (0,)
        dynamic = {name: {a: f"{name}{a}" for a in axes if a != 1} for name in ("x", "logits")}
        buffer = io.BytesIO()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            model = self.model.eval()
            form = getattr(model, "export_form", None)
            exported = _Logits(form() if callable(form) else model).eval()
            torch.onnx.export(exported, (torch.zeros(tuple(x.shape)),), buffer, input_names=["x"],
                              output_names=["logits"], dynamic_axes=dynamic, dynamo=False)
        return buffer.getvalue(), tuple(dynamic["x"].items())


def _session(model: bytes, dynamic: Tuple[Tuple[int, str], ...], shape=None):
    """An ONNX Runtime session of ``model``; with ``shape``, its dynamic dimensions fixed to it
    (see the module docstring)."""
    import onnxruntime as ort

    return ort.InferenceSession(model, session_options(dynamic, shape), providers=["CPUExecutionProvider"])


def session_options(dynamic: Tuple[Tuple[int, str], ...], shape=None):
    """The options of the runner's sessions (also for benchmarks that must run the same sessions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False  # see the module docstring: the working memory held once, not twice
    options.enable_mem_reuse = False  # see the module docstring: each map held while it is needed, no longer
    options.log_severity_level = 4  # its errors reach the caller as exceptions (a failed check is expected)
    if shape is not None:
        for axis, name in dynamic:
            options.add_free_dimension_override_by_name(name, int(shape[axis]))
    return options


def return_freed_heap() -> None:
    """Give the heap that the export freed back to the operating system (glibc only; elsewhere nothing).

    Tracing and exporting a graph allocates and frees tens to hundreds of MB in small blocks
    (measured: 190 MB for ``chs_net``'s 16 000-node trace, 125 MB for ``msa_cpp_unet``), which
    glibc keeps in the process; ``malloc_trim`` returns it (100 and 56 MB of it there), so the
    session's arena reuses the pages instead of adding to them.
    """
    gc.collect()  # the trace's Python objects first
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: no malloc_trim, or no symbols to look in
        pass


def _crop(x: torch.Tensor, sizes) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]


def _check(session, model: nn.Module, x: torch.Tensor) -> None:
    """ValueError unless ``session`` gives ``model``'s logits on ``x`` (within TOLERANCE of their range)."""
    with torch.inference_mode(False), torch.no_grad():
        expected = _Logits(model).eval()(x.clone()).numpy()
    got = session.run(None, {"x": _numpy(x)})[0]
    scale = max(1.0, float(np.abs(expected).max()))
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not difference <= TOLERANCE * scale:
        raise ValueError(f"its logits differ from PyTorch's by {difference:.3g}")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
