"""Where each network's forward pass spends its time in ONNX Runtime, and the best it could reach (issue 13).

    python -m benchmarks.forward_profile [--networks chs_net ...] [--runs 10]

For each project network: the graph the inference runner exports and checks for the input shape
the speed benchmark's CT gives (``benchmarks/results/speed.json``), run in a session with the
runner's own options, one thread, under ONNX Runtime's profiler.  The kernel time of every node
is summed by operator: convolutions (``Conv``, ``FusedConv``, ``ConvTranspose``, blocked or not)
against everything else (matrix products, pooling, layout reorders, concatenations, ...).  The
profiler slows every node, so the forward time is timed again without it (median process CPU
time) and split by the profile's shares.  Convolutions are also split by kind (dense k x k, 1 x 1,
depthwise, transposed), with the FLOPs they run: ONNX Runtime pads channels to its 16- (AVX-512)
or 8-channel (AVX2) blocks, so a narrow convolution runs more FLOPs than the network counts.

The network's FLOPs are those the speed benchmark counts (convolutions and linear layers,
``FlopCounterMode``), and the peak its 3x3-convolution peak.  Hence a bound: with every
convolution at that peak and every other operator as fast as now, the forward takes ``other +
FLOPs / peak``; it can reach no more than ``FLOPs / that / peak`` of the peak, and no fewer ms per
GFLOP than ``that / GFLOP`` (the pipeline adds its own time on top).  An operator outside the
convolutions counts against the bound only in so far as the network computes it: e.g. CHS-Net's
spectral pooling is part of the network, written as matrix products because ONNX has no real FFT
that PyTorch exports (``napari_covidseg/models/spectral_matrices.py``); the script also times those
maps in PyTorch with its FFTs, to show whether another route would be cheaper.

Results: ``benchmarks/results/forward_profile.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from benchmarks.speed import PROJECT, RESULTS, TARGET_PCT_OF_PEAK, _first_shape, _timed, conv_peak, machine

CONVOLUTIONS = ("Conv", "FusedConv", "ConvTranspose")
DEFAULT_SHAPES = {"qchc_unet3d": (1, 1, 16, 128, 128)}


def benchmark_shape(network: str) -> tuple:
    """The input shape the speed benchmark's CT gives ``network`` (its recorded run), else the default."""
    path = RESULTS / "speed.json"
    rows = json.loads(path.read_text()).get("speed", {}).get("pipelines", []) if path.exists() else []
    if any(row.get("name") == network and row.get("input_shapes") for row in rows):
        return _first_shape(rows, network)
    return DEFAULT_SHAPES.get(network, (1, 1, 256, 256))


def exported_graph(network: str, shape: tuple):
    """(model, graph bytes, dynamic axes) as the inference runner exports and checks them for ``shape``."""
    from napari_covidseg.checkpoint import load_shipped
    from napari_covidseg.onnx_backend import OnnxRunner

    model = load_shipped(network, map_location="cpu").model.eval()
    runner = OnnxRunner(model, stride=16)
    with torch.no_grad():
        runner(torch.rand(shape))
    if runner.failed or not runner.graphs:
        raise RuntimeError(f"{network}: the runner did not export a graph")
    (graph, axes), = runner.graphs.values()
    return model, graph, axes


def conv_kind(args: dict) -> tuple:
    """(kind, FLOPs as run) of a profiled convolution node, from its input and weight shapes (the
    blocked layout's padded channels included: the work ONNX Runtime does)."""
    shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
    out = next(iter(args["output_type_shape"][0].values()))
    x = shapes[0]
    if args["op_name"] == "ConvTranspose":  # weight prepacked, not listed; kernel = stride in every network here
        return "transposed", 2.0 * float(x[1]) * float(np.prod(out))
    w = shapes[1]
    flops = 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
    if w[1] == 1 and x[1] > 1:
        return "depthwise", flops
    return ("1x1" if all(k == 1 for k in w[2:]) else "dense kxk"), flops


def session(graph: bytes, axes, shape: tuple, profile_in: Optional[Path] = None):
    """A session with the inference runner's own options (as many threads as PyTorch: ``main`` sets
    one), profiling into ``profile_in``."""
    import onnxruntime as ort

    from napari_covidseg.onnx_backend import session_options

    options = session_options(axes, shape)
    if profile_in is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_in / "profile")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def forward_ms(graph: bytes, axes, shape: tuple, runs: int) -> float:
    """Median process CPU ms of a forward pass without the profiler (which slows every node)."""
    timed = session(graph, axes, shape)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    timed.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.process_time()
        timed.run(None, {"x": x})
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def kernel_times(graph: bytes, axes, shape: tuple, runs: int, folder: Path) -> tuple:
    """Per operator and per kind of convolution: ms per forward pass, nodes (and for convolutions
    the FLOPs as run), from ONNX Runtime's profile of ``runs`` passes."""
    session_ = session(graph, axes, shape, profile_in=folder)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(runs + 1):
        session_.run(None, {"x": x})
    events = json.loads(Path(session_.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1)
    ops: Dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "nodes": 0})
    kinds: Dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "nodes": 0, "gflop": 0.0})
    for event in nodes[per_run:]:  # the first pass allocates its arena
        args = event["args"]
        ops[args["op_name"]]["ms"] += event["dur"] / 1e3 / runs
        ops[args["op_name"]]["nodes"] += 1
        if args["op_name"] in CONVOLUTIONS:
            kind, flops = conv_kind(args)
            kinds[kind]["ms"] += event["dur"] / 1e3 / runs
            kinds[kind]["nodes"] += 1
            kinds[kind]["gflop"] += flops / 1e9 / runs
    for row in list(ops.values()) + list(kinds.values()):
        row["nodes"] //= runs
    return dict(ops), dict(kinds)


def spectral_maps(runs: int) -> List[dict]:
    """CHS-Net's spectral maps at the shipped network's full-resolution sizes: FFT (PyTorch) against
    the matrix products of the exported graph (PyTorch too), ms, one thread."""
    from napari_covidseg.models import spectral_matrices
    from napari_covidseg.models.spectral_pooling import spectral_lowpass2d, spectral_pool2d

    def fastest(fn) -> float:
        fn()  # warm-up
        return 1e3 * _timed(fn, runs)[1]

    rows = []
    with torch.inference_mode():
        for kind, channels in (("lowpass", 4), ("pool", 16)):
            x = torch.rand(1, channels, 256, 256)
            fft = (lambda: spectral_lowpass2d(x, 0.5)) if kind == "lowpass" else (lambda: spectral_pool2d(x, (128, 128)))
            size = (128, 128)
            rows.append({"map": f"{'low-pass' if kind == 'lowpass' else 'spectral pooling'}, {channels} x 256 x 256",
                         "fft_ms": fastest(fft),
                         "matrices_ms": fastest(lambda: spectral_matrices.apply(x, kind, size))})
    return rows


def profile(network: str, runs: int, peak: float, folder: Path) -> dict:
    from benchmarks.model_complexity import count_flops

    shape = benchmark_shape(network)
    model, graph, axes = exported_graph(network, shape)
    flops, _ = count_flops(model, shape)
    ops, kinds = kernel_times(graph, axes, shape, runs, folder)
    profiled = sum(r["ms"] for r in ops.values())
    total = forward_ms(graph, axes, shape, runs)
    for row in list(ops.values()) + list(kinds.values()):  # the profile's shares of the unprofiled time
        row["ms"] *= total / profiled
    conv = sum(r["ms"] for op, r in ops.items() if op in CONVOLUTIONS)
    gflop = flops / 1e9
    best_ms = (total - conv) + gflop / peak * 1e3
    return {
        "network": network, "shape": list(shape), "gflop": gflop, "forward_ms": total, "profiled_ms": profiled,
        "conv_ms": conv,
        "other_ms": total - conv, "pct_of_peak": 100.0 * gflop / (total / 1e3) / peak,
        "best_ms": best_ms, "best_pct_of_peak": 100.0 * gflop / (best_ms / 1e3) / peak,
        "best_ms_per_gflop": best_ms / gflop, "ms_per_gflop": total / gflop,
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"])),
        "convolutions": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])), "load": os.getloadavg(),
    }


def with_fft_spectral_maps(row: dict, spectral: List[dict], peak: float) -> dict:
    """``row``'s bound with its matrix products (the spectral maps) as fast as PyTorch's FFTs too:
    their time scaled by the FFT / matrix ratio of the timed maps."""
    ratio = sum(s["fft_ms"] for s in spectral) / sum(s["matrices_ms"] for s in spectral)
    best_ms = row["best_ms"] - (1.0 - ratio) * row["ops"].get("MatMul", {"ms": 0.0})["ms"]
    return {"ratio": ratio, "best_ms": best_ms, "best_pct_of_peak": 100.0 * row["gflop"] / (best_ms / 1e3) / peak}


def to_markdown(result: dict) -> str:
    peak = result["peak"]
    lines = [
        "# Forward passes in ONNX Runtime: where the time goes, and the best reachable (issue 13)", "",
        f"`python -m benchmarks.forward_profile` on {result['date']}: {result['machine']['cpu']}, one thread, "
        f"{result['runs']} profiled passes per network (ONNX Runtime {result['onnxruntime']}). "
        f"Conv peak {peak['gflops_per_s']:.1f} GFLOP/s ({peak['layer']}).", "",
        "Forward: median process CPU time of a pass without the profiler, split by the profile's shares "
        "(the profiler itself slows every node). *Best* = every convolution at the peak on the network's "
        "FLOPs, every other operator as now: a bound on what faster convolutions alone could give.", "",
        "| network | input | GFLOP | forward ms | convolutions ms | other ms | % of peak | "
        "best ms | best % of peak | best ms / GFLOP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["networks"]:
        lines.append(f"| {r['network']} | {tuple(r['shape'])} | {r['gflop']:.2f} | {r['forward_ms']:.1f} | "
                     f"{r['conv_ms']:.1f} | {r['other_ms']:.1f} | {r['pct_of_peak']:.0f} % | {r['best_ms']:.1f} | "
                     f"{r['best_pct_of_peak']:.0f} % | {r['best_ms_per_gflop']:.1f} |")
    lines += ["", f"Target of a 2D network: {TARGET_PCT_OF_PEAK:.0f} % of the peak in its forward pass.", "",
              "## Operators outside the convolutions (ms per forward pass, nodes)", ""]
    for r in result["networks"]:
        others = [(op, v) for op, v in r["ops"].items() if op not in CONVOLUTIONS][:8]
        lines.append(f"- {r['network']}: " + ", ".join(f"{op} {v['ms']:.1f} ({v['nodes']})" for op, v in others))
    lines += ["", "## Convolutions by kind (ms per forward pass, nodes, GFLOP as run with the blocked layout's "
              "padding, GFLOP/s)", ""]
    for r in result["networks"]:
        lines.append(f"- {r['network']}: " + ", ".join(
            f"{kind} {v['ms']:.1f} ({v['nodes']}, {v['gflop']:.2f}, {1e3 * v['gflop'] / v['ms']:.0f})"
            for kind, v in r["convolutions"].items() if v["ms"] > 0))
    if result.get("spectral"):
        lines += ["", "## CHS-Net's spectral maps: FFT against matrix products (PyTorch, one thread, fastest ms)", "",
                  "| map | FFT (rfft2 / irfft2) | matrix products |", "|---|---|---|"]
        lines += [f"| {s['map']} | {s['fft_ms']:.2f} | {s['matrices_ms']:.2f} |" for s in result["spectral"]]
        chs = next((r for r in result["networks"] if r["network"] == "chs_net"), None)
        if chs:
            bound = with_fft_spectral_maps(chs, result["spectral"], peak["gflops_per_s"])
            lines += ["", f"With its matrix products as fast as these FFTs as well (their time x {bound['ratio']:.2f}), "
                      f"CHS-Net's best is {bound['best_ms']:.1f} ms, {bound['best_pct_of_peak']:.0f} % of the peak."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(PROJECT), choices=PROJECT)
    parser.add_argument("--runs", type=int, default=10, help="profiled forward passes per network (default 10)")
    parser.add_argument("--out", default=str(RESULTS / "forward_profile"), help="results path without suffix")
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(1)
    peak = conv_peak()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "onnxruntime": onnxruntime.__version__, "runs": args.runs, "peak": peak, "networks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for network in args.networks:
            row = profile(network, args.runs, peak["gflops_per_s"], Path(tmp))
            print(f"  {network}: forward {row['forward_ms']:.1f} ms, convolutions {row['conv_ms']:.1f}, "
                  f"best {row['best_pct_of_peak']:.0f} % of peak", flush=True)
            result["networks"].append(row)
    if "chs_net" in args.networks:
        result["spectral"] = spectral_maps(args.runs)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
