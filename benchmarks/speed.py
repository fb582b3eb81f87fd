"""Inference speed, efficiency and memory of the project's five pipelines against peer methods,
plus the GUI's metric timings (issue 13).

    python -m benchmarks.speed [--slices 8] [--rounds 3] [--threads 1] [--memory-slices 60 300]
                               [--skip-memory] [--skip-gui] [--compile unet ...] [--onnx msa_cpp_unet ...]

Peers come from the optional extra ``peers`` (``pip install napari-covidseg[peers]``, never a
runtime dependency): lungmask's R231 inference routine (``LMInferer.apply``, its own resampling to
256 x 256, batches of 20 and post-processing) and MONAI's BasicUNet and UNet run slice by slice
with ``monai.inferers.SliceInferer``; nnU-Net's ``PlainConvUNet`` (from dynamic_network_architectures,
the 2D configuration nnU-Net plans for 512 x 512 CT: 8 stages, 32..512 features, instance norm)
runs in a plain slice loop, because nnU-Net's predictor (nnunetv2) is not installed.  Peers run
with random weights (their real weights are downloaded at run time, which this machine cannot);
the speed of a network does not depend on its weights.  The project's pipelines run with the
weights shipped in ``napari_covidseg/weights`` at the time of the run (``segment_volume``: domain
mapping, normalisation, resizing, forward, thresholding).

What is measured, on one synthetic 512 x 512 chest CT (``make_phantom``) of ``--slices`` slices:

* per pipeline, in ``--rounds`` interleaved rounds: the whole call (wall and process CPU time) and,
  with forward hooks on the network, the time inside its forward passes and the shapes it saw;
  GFLOP = conv / linear FLOPs of those forward passes (``FlopCounterMode``, 2 per multiply-add);
* the CPU's 3x3-convolution peak (channels-last, several layer sizes, the best), so each forward
  is reported as % of that peak and as ms per GFLOP;
* the project networks with channels-last input on and off (the per-network setting in
  ``napari_covidseg/inference_settings.py`` comes from this);
* OpenMP's wait policy with 2 threads on a shared CPU (child processes);
* peak memory: the resident memory a run adds, in a process of its own per pipeline, on int16
  NIfTI CTs of two sizes (``--memory-slices``), so the cost per CT voxel and the figure for
  512 x 512 x 300 follow;
* the GUI's metrics on a 200 x 512 x 512 pair: HD95 (and the former dense-EDT version), the
  ratio metrics, and Compare's GUI-thread CPU time per edit (``tests/test_compare_speed.py``).

With one thread the process CPU time is the compute time even on a machine others share; the wall
time then also holds the time spent waiting for a core.  Every figure is written with the load
average seen while it was measured.  Results: ``benchmarks/results/speed.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("unet", "ms_unet", "msa_cpp_unet", "chs_net", "qchc_unet3d")
SPACING = (2.5, 0.7, 0.7)
#: issue 13's target for a 2D network's forward pass, % of the measured conv peak
TARGET_PCT_OF_PEAK = 45.0


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    name: str
    group: str  # "project" or "peer"
    what: str
    model: torch.nn.Module
    run: Callable[[np.ndarray], object]
    forward_times: List[tuple] = field(default_factory=list)
    shapes: List[tuple] = field(default_factory=list)


def describe(settings) -> str:
    from napari_covidseg import onnx_backend

    if settings.onnx and onnx_backend.available():  # its own layout, its own folding
        return "ONNX Runtime"
    folded = ", BatchNorm folded" if getattr(settings, "fold_batch_norm", False) else ""
    return f"PyTorch, {'channels-last' if settings.channels_last else 'contiguous'}{folded}"


def project_pipeline(network: str, compile: bool = False, **overrides) -> Pipeline:
    """``segment_volume`` with the shipped weights; ``overrides`` replace fields of the network's
    inference settings (the alternatives the chosen settings are measured against)."""
    from dataclasses import replace

    from napari_covidseg import inference_settings
    from napari_covidseg.checkpoint import load_shipped
    from napari_covidseg.inference import segment_volume

    loaded = load_shipped(network, map_location="cpu")
    prep = loaded.preprocessing
    settings = replace(inference_settings.NETWORK_SETTINGS[network], **overrides)

    def run(ct):
        chosen = inference_settings.NETWORK_SETTINGS[network]
        inference_settings.NETWORK_SETTINGS[network] = settings
        try:
            return segment_volume(loaded, ct, SPACING, device="cpu", domain="hu", compile=compile)
        finally:
            inference_settings.NETWORK_SETTINGS[network] = chosen

    size = prep.inplane_size or prep.target_spacing
    what = (f"shipped weights, {prep.domain} domain, "
            f"{'in-plane ' + str(tuple(size)) if prep.inplane_size else 'target spacing ' + str(size)}; {describe(settings)}")
    label = f" [{describe(settings)}]" if overrides else ""
    return Pipeline(network + label + (" [compiled]" if compile else ""), "project", what, loaded.model, run)


def alternatives(network: str) -> List[Pipeline]:
    """The settings not chosen: the other memory format in PyTorch, PyTorch (as set up without ONNX
    Runtime) where ONNX Runtime is chosen, and the BatchNorms unfolded where folding is chosen."""
    from napari_covidseg import onnx_backend
    from napari_covidseg.inference_settings import NETWORK_SETTINGS

    chosen = NETWORK_SETTINGS[network]
    uses_onnx = chosen.onnx and onnx_backend.available()
    out = [project_pipeline(network, channels_last=not chosen.channels_last, onnx=False, fold_batch_norm=False)]
    if uses_onnx:
        out.append(project_pipeline(network, channels_last=chosen.channels_last, onnx=False))
    if chosen.fold_batch_norm and not uses_onnx:
        out.append(project_pipeline(network, channels_last=chosen.channels_last, fold_batch_norm=False))
    return out


def _normalised(ct: np.ndarray) -> np.ndarray:
    return ((np.clip(ct, -1024, 600).astype(np.float32) + 1024) / 1624).astype(np.float32)


def lungmask_pipeline(folder: Path) -> Pipeline:
    from lungmask.mask import LMInferer
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    path = folder / "r231_random.pth"
    torch.save(net.state_dict(), path)
    inferer = LMInferer(modelpath=str(path), force_cpu=True, tqdm_disable=True)
    return Pipeline("lungmask R231", "peer", "LMInferer.apply: 256x256, batch 20, post-processing; random weights",
                    inferer.model, inferer.apply)


def monai_pipeline(kind: str) -> Pipeline:
    from monai.inferers import SliceInferer
    from monai.networks.nets import BasicUNet, UNet

    torch.manual_seed(0)
    if kind == "BasicUNet":
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    else:
        net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                   strides=(2, 2, 2, 2), num_res_units=2)
    net.eval()
    inferer = SliceInferer(roi_size=(512, 512), sw_batch_size=4, spatial_dim=0, progress=False)

    def run(ct):
        x = torch.from_numpy(_normalised(ct))[None, None]
        with torch.inference_mode():
            prob = torch.sigmoid(inferer(x, net))
        return (prob > 0.5).to(torch.uint8).numpy()

    return Pipeline(f"MONAI {kind}", "peer", "SliceInferer on 512x512 slices, batch 4; random weights", net, run)


def nnunet_pipeline() -> Pipeline:
    import torch.nn as nn
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 8, (32, 64, 128, 256, 512, 512, 512, 512), nn.Conv2d, 3, (1, 2, 2, 2, 2, 2, 2, 2),
                        (2,) * 8, 2, (2,) * 7, conv_bias=True, norm_op=nn.InstanceNorm2d,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()

    def run(ct):
        out = np.empty(ct.shape, np.uint8)
        with torch.inference_mode():
            for start in range(0, ct.shape[0], 4):
                x = torch.from_numpy(_normalised(ct[start:start + 4]))[:, None]
                out[start:start + 4] = net(x).argmax(1).to(torch.uint8).numpy()
        return out

    return Pipeline("nnU-Net PlainConvUNet", "peer", "nnU-Net's 2D 512x512 architecture, plain slice loop, batch 4 "
                    "(nnunetv2's predictor not installed); random weights", net, run)


def peer_pipelines(folder: Path) -> tuple:
    """(pipelines, {peer: why it is missing})."""
    makers = {"lungmask R231": lambda: lungmask_pipeline(folder), "MONAI BasicUNet": lambda: monai_pipeline("BasicUNet"),
              "MONAI UNet": lambda: monai_pipeline("UNet"), "nnU-Net PlainConvUNet": nnunet_pipeline}
    found, missing = [], {}
    for name, make in makers.items():
        try:
            found.append(make())
        except ImportError as exc:
            missing[name] = f"not installed ({exc}); pip install napari-covidseg[peers]"
    return found, missing


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _hook(pipeline: Pipeline) -> Callable[[], None]:
    """Record each forward's (wall, CPU) seconds and input shape; returns the undo.  Peers: hooks on
    their network; project pipelines: around ``inference._forward_logits``, whatever runs the
    network (PyTorch, ONNX Runtime, a compiled graph)."""
    from napari_covidseg import inference

    def start(shape):
        pipeline.shapes.append(tuple(shape))
        return time.perf_counter(), time.process_time()

    def stop(started):
        pipeline.forward_times[-1][0] += time.perf_counter() - started[0]
        pipeline.forward_times[-1][1] += time.process_time() - started[1]

    if pipeline.group == "project":
        real = inference._forward_logits

        def timed(model, x, stride):
            started = start(inference._pad_to_multiple(x, stride)[0].shape)
            try:
                return real(model, x, stride)
            finally:
                stop(started)

        inference._forward_logits = timed
        return lambda: setattr(inference, "_forward_logits", real)
    state = {}
    handles = [pipeline.model.register_forward_pre_hook(lambda m, args: state.update(t=start(args[0].shape))),
               pipeline.model.register_forward_hook(lambda m, args, out: stop(state.pop("t")))]
    return lambda: [h.remove() for h in handles]


def run_once(pipeline: Pipeline, ct: np.ndarray) -> dict:
    """One timed call of the pipeline: whole call and its forward passes, wall and CPU seconds."""
    pipeline.forward_times.append([0.0, 0.0])
    pipeline.shapes.clear()
    undo = _hook(pipeline)
    try:
        before = load()
        wall, cpu = time.perf_counter(), time.process_time()
        pipeline.run(ct)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        undo()
    fw_wall, fw_cpu = pipeline.forward_times[-1]
    return {"wall_s": wall, "cpu_s": cpu, "forward_wall_s": fw_wall, "forward_cpu_s": fw_cpu,
            "load": (before + load()) / 2}


def forward_flops(pipeline: Pipeline) -> float:
    """Conv / linear FLOPs of the forward passes the last run made (counted once per shape)."""
    from benchmarks.model_complexity import count_flops

    total = 0.0
    for shape in set(pipeline.shapes):
        flops, _ = count_flops(pipeline.model, shape)
        total += flops * pipeline.shapes.count(shape)
    pipeline.model.to("cpu")
    return total


def conv_peak(repeats: int = 5) -> dict:
    """The best GFLOP/s of a 3x3 convolution (channels-last) over a few layer sizes."""
    best = {"gflops_per_s": 0.0}
    for channels, size in ((64, 128), (128, 64), (256, 32)):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval().to(memory_format=torch.channels_last)
        x = torch.randn(4, channels, size, size).contiguous(memory_format=torch.channels_last)
        flops = 2.0 * channels * channels * 9 * size * size * 4
        with torch.inference_mode():
            conv(x)
            seconds = []
            for _ in range(repeats):
                start = time.process_time()
                conv(x)
                seconds.append(time.process_time() - start)
        rate = flops / min(seconds) / 1e9
        if rate > best["gflops_per_s"]:
            best = {"gflops_per_s": rate, "layer": f"3x3 conv {channels}->{channels}, 4x{size}x{size}, channels-last"}
    return best


def time_pipelines(pipelines: List[Pipeline], ct: np.ndarray, rounds: int) -> Dict[str, list]:
    """``rounds`` interleaved rounds (every pipeline once per round, after one warm-up each)."""
    for pipeline in pipelines:
        print(f"  warm-up {pipeline.name}", flush=True)
        run_once(pipeline, ct)
    runs = {p.name: [] for p in pipelines}
    for r in range(rounds):
        for pipeline in pipelines:
            runs[pipeline.name].append(run_once(pipeline, ct))
            last = runs[pipeline.name][-1]
            print(f"  round {r + 1} {pipeline.name:34s} {last['cpu_s']:7.2f} s CPU ({last['forward_cpu_s']:6.2f} s "
                  f"forward), {last['wall_s']:7.2f} s wall, load {last['load']}", flush=True)
    return runs


def summarise(pipeline: Pipeline, runs: list, slices: int, gflop: float, peak: float) -> dict:
    cpu = statistics.median(r["cpu_s"] for r in runs)
    forward = statistics.median(r["forward_cpu_s"] for r in runs)
    fastest_forward = min(r["forward_cpu_s"] for r in runs)
    per_slice_gflop = gflop / 1e9 / slices
    return {
        "name": pipeline.name, "group": pipeline.group, "what": pipeline.what,
        "input_shapes": sorted({str(s) for s in pipeline.shapes}),
        "s_per_slice_cpu": cpu / slices, "s_per_slice_wall": statistics.median(r["wall_s"] for r in runs) / slices,
        "forward_s_per_slice_cpu": forward / slices, "gflop_per_slice": per_slice_gflop,
        "ms_per_gflop_forward": 1e3 * forward / slices / per_slice_gflop if per_slice_gflop else None,
        "ms_per_gflop_pipeline": 1e3 * cpu / slices / per_slice_gflop if per_slice_gflop else None,
        "pct_of_peak_forward": 100.0 * gflop / 1e9 / forward / peak if forward else None,
        "pct_of_peak_forward_fastest": 100.0 * gflop / 1e9 / fastest_forward / peak if fastest_forward else None,
        "load": [r["load"] for r in runs], "runs": runs,
    }


# ------------------------------------------------------------------------------------------------
# thread policy (child processes: OpenMP reads its settings when it starts)
# ------------------------------------------------------------------------------------------------
def thread_child(threads: int, repeats: int) -> None:
    """Child: median wall / CPU seconds of a U-Net forward (batch 4, 256x256) with ``threads``."""
    import torch as _torch  # before napari_covidseg: the package's OMP_WAIT_POLICY default stays out

    from napari_covidseg.models import get_network

    _torch.set_num_threads(threads)
    model = get_network("unet").create(base=16).eval()
    x = _torch.randn(4, 1, 256, 256)
    walls, cpus = [], []
    with _torch.inference_mode():
        model(x)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            model(x)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(json.dumps({"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "load": load()}))


THREAD_POLICIES = (("2 threads, OMP_WAIT_POLICY unset", 2, None), ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, "PASSIVE"),
                   ("2 threads, OMP_WAIT_POLICY=ACTIVE", 2, "ACTIVE"), ("1 thread", 1, None))


def thread_policies(rounds: int, repeats: int = 3) -> list:
    results = {name: [] for name, _, _ in THREAD_POLICIES}
    for _ in range(rounds):
        for name, threads, policy in THREAD_POLICIES:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            done = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--thread-child", str(threads),
                                   "--rounds", str(repeats)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            if done.returncode == 0:
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {name}: {results[name][-1] if results[name] else done.stderr[-300:]}", flush=True)
    return [{"policy": name, "wall_s": statistics.median(r["wall_s"] for r in runs) if runs else None,
             "cpu_s": statistics.median(r["cpu_s"] for r in runs) if runs else None, "load": [r["load"] for r in runs]}
            for name, runs in results.items()]


# ------------------------------------------------------------------------------------------------
# memory (a child process per pipeline and CT)
# ------------------------------------------------------------------------------------------------
def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), in MB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith(field + ":"))


def memory_child(name: str, ct_path: str, out_dir: str) -> None:
    """Child: the resident memory ``name`` adds segmenting ``ct_path`` (read from the file, masks
    written for the project's pipelines, as ``covidseg segment`` does)."""
    from napari_covidseg import cli_segment
    from napari_covidseg.io.loader import load_any

    with tempfile.TemporaryDirectory() as folder:
        pipeline = None if name in PROJECT else {p.name: p for p in peer_pipelines(Path(folder))[0]}[name]
        baseline = resident_mb()
        started = time.perf_counter()
        if pipeline is None:
            cli_segment.main([ct_path, "--network", name, "--device", "cpu", "--out-dir", out_dir, "--quiet", "--overwrite"])
        else:
            pipeline.run(np.asarray(load_any(ct_path).data))
        # VmHWM belongs to this process's own address space; getrusage's ru_maxrss is not usable
        # here: Linux carries it over fork and exec, so a child reports its parent's peak
        peak = resident_mb("VmHWM")
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "added_mb": peak - baseline,
                      "seconds": time.perf_counter() - started}))


def write_ct(path: Path, slices: int) -> Path:
    import nibabel as nib

    from napari_covidseg.phantom import make_phantom

    ct = make_phantom(shape=(slices, 512, 512), spacing=SPACING, seed=0).ct.astype(np.int16)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), affine), str(path))
    return path


def memory_slices(name: str, slices: List[int]) -> List[int]:
    """The CT sizes measured for ``name``: a 3D network's patch is clipped to the volume (the shipped
    qchc_unet3d: up to 80 slices), so its working memory grows with small CTs and the slope between
    them is not the cost per slice; it is measured on CTs at least one patch deep."""
    from napari_covidseg.models import get_network

    if name in PROJECT and get_network(name).dims == 3:
        depth = int(get_network(name).recipe.input_size[0])
        return [n + max(0, depth - min(slices)) for n in sorted(slices)]
    return list(slices)


def memory(names: List[str], slices: List[int], folder: Path) -> list:
    cts = {}
    rows = []
    for name in names:
        measured = {}
        for n in memory_slices(name, slices):
            path = cts.get(n) or cts.setdefault(n, write_ct(folder / f"ct_{n}.nii", n))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--memory-child", name, str(path),
                                   str(folder / "out")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
            if done.returncode != 0:
                print(f"  {name} {n} slices failed: {done.stderr[-500:]}", flush=True)
                break
            measured[n] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {name:24s} {n:4d} slices: +{measured[n]['added_mb']:.0f} MB ({measured[n]['seconds']:.0f} s)", flush=True)
        rows.append(_memory_row(name, measured))
    return rows


def _memory_row(name: str, measured: dict) -> dict:
    """Bytes per CT voxel (slope between the two sizes) and the figure for 512x512x300."""
    row = {"name": name, "measured": {str(k): v for k, v in measured.items()},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if len(measured) >= 2:
        (n1, a), (n2, b) = sorted(measured.items())[:1] + sorted(measured.items())[-1:]
        per_voxel = (b["added_mb"] - a["added_mb"]) * 2**20 / ((n2 - n1) * 512 * 512)
        fixed_mb = a["added_mb"] - per_voxel * n1 * 512 * 512 / 2**20
        at_300 = fixed_mb + per_voxel * 300 * 512 * 512 / 2**20
        row.update(bytes_per_voxel=per_voxel, fixed_mb=fixed_mb, added_mb_300=at_300,
                   ratio_300=at_300 / (300 * 512 * 512 * 4 / 2**20))
    return row


# ------------------------------------------------------------------------------------------------
# GUI metrics on a 200 x 512 x 512 pair
# ------------------------------------------------------------------------------------------------
def _edt_hd95(pred, gt, spacing) -> float:
    """The former HD95 (dense distance transforms of the bounding box), for comparison."""
    from scipy import ndimage

    either = pred | gt
    box = tuple(slice(max(int(np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))[0]) - 1, 0),
                      int(np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))[-1]) + 2)
                for axis in range(3))
    structure = ndimage.generate_binary_structure(3, 1)
    p, g = pred[box], gt[box]
    sp_ = p & ~ndimage.binary_erosion(p, structure, border_value=0)
    sg_ = g & ~ndimage.binary_erosion(g, structure, border_value=0)
    d = np.concatenate([ndimage.distance_transform_edt(~sg_, sampling=spacing)[sp_],
                        ndimage.distance_transform_edt(~sp_, sampling=spacing)[sg_]])
    return float(np.percentile(d, 95))


def _timed(fn, repeats: int) -> tuple:
    """(value, fastest CPU seconds, median wall seconds)."""
    cpus, walls = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return value, min(cpus), statistics.median(walls)


def metric_pairs() -> dict:
    """Two 200x512x512 pairs: the phantom's lungs against a prediction that misses and adds a
    little at the border, and two lung-sized ellipsoids shifted by 2 voxels (tests/test_compare_speed.py)."""
    from scipy import ndimage

    sys.path.insert(0, str(ROOT / "tests"))
    from test_compare_speed import _pair

    from napari_covidseg.phantom import make_phantom

    lung = make_phantom(shape=(200, 512, 512), spacing=(1.5, 0.7, 0.7), seed=0).lung != 0
    rng = np.random.default_rng(0)
    noise = ndimage.zoom(rng.standard_normal((25, 32, 32)), (8, 16, 16), order=1)
    prediction = np.where(noise > 0.5, ndimage.binary_dilation(lung, iterations=2), lung) & ~((noise < -1.0) & ~ndimage.binary_erosion(lung, iterations=2))
    pred, gt = _pair()
    return {"phantom lungs": (prediction, lung), "shifted ellipsoids": (pred != 0, gt != 0)}


def gui_metrics(repeats: int) -> dict:
    from napari_covidseg import metrics
    from napari_covidseg.overlay import compare_masks, region_metrics

    out = {"pairs": []}
    spacing = (1.5, 0.7, 0.7)
    for name, (p, g) in metric_pairs().items():
        row = {"pair": name, "shape": list(p.shape)}
        row["hd95_mm"], row["hd95_s"], row["hd95_wall_s"] = _timed(lambda: metrics.hd95(p, g, spacing), repeats)
        row["hd95_former_mm"], row["hd95_former_s"], _ = _timed(lambda: _edt_hd95(p, g, spacing), 1)
        _, row["region_metrics_s"], _ = _timed(lambda: region_metrics(p, g, spacing, with_hd95=False), repeats)
        _, row["five_counts_s"], _ = _timed(lambda: [metrics.confusion(p, g) for _ in range(5)], repeats)
        _, row["compare_masks_s"], _ = _timed(lambda: compare_masks(p, g), repeats)
        row["load"] = load()
        out["pairs"].append(row)
        print(f"  {name}: HD95 {row['hd95_mm']:.3f} mm in {row['hd95_s']:.2f} s (former {row['hd95_former_mm']:.3f} mm "
              f"in {row['hd95_former_s']:.2f} s); ratios {row['region_metrics_s']:.3f} s", flush=True)
    out["compare_gui_thread"] = compare_gui_thread()
    return out


def compare_gui_thread() -> Optional[dict]:
    """Compare's GUI-thread CPU seconds (Compare, one edit) from tests/test_compare_speed.py."""
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_compare_speed.py"]
    if not os.environ.get("DISPLAY"):
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + command
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("GUI thread:"):
            words = line.split()
            print(f"  {line}", flush=True)
            return {"compare_s": float(words[3]), "edit_s": float(words[6]), "line": line, "load": load()}
    print(f"  Compare GUI-thread test did not report: {done.stdout[-500:]} {done.stderr[-500:]}", flush=True)
    return None


# ------------------------------------------------------------------------------------------------
# opt-in paths: torch.compile, ONNX Runtime
# ------------------------------------------------------------------------------------------------
def compiled(network: str, ct: np.ndarray, rounds: int) -> dict:
    """First call (compiles) and later calls of the compiled pipeline against the eager one; masks compared."""
    eager, fast = project_pipeline(network), project_pipeline(network, compile=True)
    reference = eager.run(ct)
    first, _, first_wall = _timed(lambda: fast.run(ct), 1)
    same = all(np.array_equal(getattr(first, k), getattr(reference, k)) for k in ("lung", "infection"))
    runs = {"eager": [], "compiled": []}
    for _ in range(rounds):
        runs["eager"].append(_timed(lambda: eager.run(ct), 1)[1])
        runs["compiled"].append(_timed(lambda: fast.run(ct), 1)[1])
    row = {"network": network, "first_call_wall_s": first_wall, "identical_masks": same,
           "eager_cpu_s": statistics.median(runs["eager"]), "compiled_cpu_s": statistics.median(runs["compiled"]),
           "load": load()}
    print(f"  compile {network}: {row}", flush=True)
    return row


def onnx_runtime(network: str, shape: tuple, repeats: int, folder: Path) -> dict:
    """Forward of the shipped network in PyTorch and in ONNX Runtime (1 thread) at ``shape``."""
    import onnxruntime as ort

    from napari_covidseg.checkpoint import load_shipped

    model = load_shipped(network, map_location="cpu").model.eval()
    x = torch.rand(shape)  # in the normalised range the networks read (0..1), not unbounded noise

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out["logits"] if isinstance(out, dict) else out

    wrapped = Logits(model).eval()
    path = folder / f"{network}.onnx"
    try:
        torch.onnx.export(wrapped, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return {"network": network, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    with torch.inference_mode():
        expected = wrapped(x).numpy()
        _, torch_s, _ = _timed(lambda: wrapped(x), repeats)
    got, ort_s, _ = _timed(lambda: session.run(None, {"x": x.numpy()})[0], repeats)
    row = {"network": network, "shape": list(shape), "torch_cpu_s": torch_s, "ort_cpu_s": ort_s,
           "max_abs_logit_diff": float(np.abs(got - expected).max()),
           # the backend's own check (difference over the logits' range) and what a mask sees (the sign)
           "relative_diff": float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))),
           "same_mask_fraction": float(np.mean((got > 0) == (expected > 0))), "load": load()}
    print(f"  onnx {network}: {row}", flush=True)
    return row


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def shipped_weights() -> dict:
    from napari_covidseg.checkpoint import load_shipped

    out = {}
    for name in PROJECT:
        prep = load_shipped(name, map_location="cpu").preprocessing
        out[name] = {"domain": prep.domain, "inplane_size": prep.inplane_size, "target_spacing": prep.target_spacing,
                     "normalisation": prep.normalisation}
    return out


def speed(args, folder: Path) -> dict:
    from napari_covidseg.inference_settings import NETWORK_SETTINGS
    from napari_covidseg.phantom import make_phantom

    ct = make_phantom(shape=(max(4, args.slices), 512, 512), spacing=SPACING, seed=0).ct[:args.slices]
    peak = conv_peak()
    print(f"conv peak: {peak}", flush=True)
    peers, missing = peer_pipelines(folder)
    project = [project_pipeline(n) for n in PROJECT]
    others = [p for n in PROJECT for p in alternatives(n)]
    pipelines = project + others + peers
    runs = time_pipelines(pipelines, ct, args.rounds)
    rows = []
    for pipeline in pipelines:  # its shapes are those of its last timed run
        rows.append(summarise(pipeline, runs[pipeline.name], args.slices, forward_flops(pipeline), peak["gflops_per_s"]))
    layouts = []
    for network in PROJECT:
        chosen = next(r for r in rows if r["name"] == network)
        for other in (r for r in rows if r["name"].startswith(network + " [")):
            layouts.append({"network": network, "chosen": describe(NETWORK_SETTINGS[network]),
                            "chosen_forward_s": chosen["forward_s_per_slice_cpu"], "other": other["name"],
                            "other_forward_s": other["forward_s_per_slice_cpu"],
                            "speedup_of_chosen": other["forward_s_per_slice_cpu"] / chosen["forward_s_per_slice_cpu"]})
    extra = {}
    if args.compile:
        extra["compile"] = [compiled(n, ct, args.rounds) for n in args.compile]
    if args.onnx:
        extra["onnx"] = [onnx_runtime(n, _first_shape(rows, n), 3, folder) for n in args.onnx]
    return {"slices": args.slices, "ct": f"make_phantom {args.slices}x512x512 at {SPACING} mm", "conv_peak": peak,
            "pipelines": rows, "layouts": layouts, "missing_peers": missing, **extra}


def _first_shape(rows, network) -> tuple:
    row = next(r for r in rows if r["name"] == network)
    return tuple(int(v) for v in row["input_shapes"][0].strip("()").split(",") if v.strip())


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=8, help="slices of the 512x512 CT timed (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1: CPU time = compute time)")
    parser.add_argument("--memory-slices", type=int, nargs="+", default=[20, 80],
                        help="slice counts of the 512x512 CTs for peak memory (default 20 80; the slope gives 300)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-gui", action="store_true")
    parser.add_argument("--skip-threads", action="store_true")
    parser.add_argument("--compile", nargs="*", default=[], help="networks to time with torch.compile (slow to compile)")
    parser.add_argument("--onnx", nargs="*", default=[], help="networks to time in ONNX Runtime")
    parser.add_argument("--out", default=str(RESULTS / "speed"), help="results path without suffix")
    parser.add_argument("--memory-for", nargs="+", metavar="PIPELINE", help="measure the memory of these pipelines only")
    parser.add_argument("--update", action="store_true",
                        help="keep the sections of the existing results that this run skips (e.g. redo only --skip-speed ...)")
    parser.add_argument("--thread-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.thread_child:
        thread_child(args.thread_child, args.rounds)
        return 0
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.with_suffix(".json").read_text()) if args.update else {}
    # the header (date, load, weights) describes the speed table; a run that keeps it keeps its header
    timed = not args.skip_speed or "speed" not in result
    if timed:
        result.update({"machine": machine(), "load_start": os.getloadavg(), "shipped": shipped_weights()})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_speed:
            result["speed"] = speed(args, folder)
        if not args.skip_threads:
            result["threads"] = thread_policies(args.rounds)
        if not args.skip_memory:
            names = args.memory_for or list(PROJECT) + [p.name for p in peer_pipelines(folder)[0]]
            fresh = {row["name"]: row for row in memory(names, args.memory_slices, folder)}
            kept = [fresh.pop(row["name"], row) for row in result.get("memory", [])]  # --update: replaced in place
            result["memory"] = kept + list(fresh.values())
        if not args.skip_gui:
            result["gui"] = gui_metrics(3)
    if timed:
        result["load_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _memory_text(row: dict) -> str:
    return f"+{row['added_mb_300']:.0f} MB ({row['ratio_300']:.2f}x)" if "added_mb_300" in row else "-"


def _speed_table(speed: dict, memory: Dict[str, dict]) -> List[str]:
    lines = ["| pipeline | network input (shapes seen) | s / slice CPU (wall) | forward s / slice | GFLOP / slice | "
             "ms / GFLOP forward (pipeline) | % of conv peak, median (fastest) | memory at 512x512x300 (x CT float32) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in speed["pipelines"]:
        memory_text = _memory_text(memory.get(row["name"], {}))
        lines.append(f"| {row['name']} | {', '.join(row['input_shapes'])} | {_f(row['s_per_slice_cpu'], 3)} "
                     f"({_f(row['s_per_slice_wall'], 3)}) | {_f(row['forward_s_per_slice_cpu'], 3)} | "
                     f"{_f(row['gflop_per_slice'], 2)} | {_f(row['ms_per_gflop_forward'], 1)} "
                     f"({_f(row['ms_per_gflop_pipeline'], 1)}) | {_f(row['pct_of_peak_forward'], 0)} % "
                     f"({_f(row['pct_of_peak_forward_fastest'], 0)} %) | {memory_text} |")
    return lines


def _targets(result: dict) -> List[str]:
    speed, gui = result.get("speed", {}), result.get("gui", {})
    rows = {r["name"]: r for r in speed.get("pipelines", [])}
    peers = [r["ms_per_gflop_pipeline"] for r in rows.values() if r["group"] == "peer" and r["ms_per_gflop_pipeline"]]
    best_peer = min(peers) if peers else None
    memory = {r["name"]: r for r in result.get("memory", [])}
    lines = [f"| network | >= {TARGET_PCT_OF_PEAK:.0f} % of conv peak (2D) | pipeline ms / GFLOP <= 1.3 x best peer | "
             "memory <= 1.5x |",
             "|---|---|---|---|"]
    for name in PROJECT:
        row = rows.get(name)
        if row is None:
            continue
        pct = row["pct_of_peak_forward"]
        eff = row["ms_per_gflop_pipeline"]
        ratio = memory.get(name, {}).get("ratio_300")
        lines.append(f"| {name} | {'n/a (3D)' if name == 'qchc_unet3d' else ('yes' if pct >= TARGET_PCT_OF_PEAK else 'no') + f' ({pct:.0f} %)'} | "
                     f"{('yes' if best_peer and eff <= 1.3 * best_peer else 'no') + f' ({eff:.1f} vs {_f(best_peer, 1)})'} | "
                     f"{'-' if ratio is None else ('yes' if ratio <= 1.5 else 'no') + f' ({ratio:.2f}x)'} |")
    for pair in gui.get("pairs", []):
        lines.append(f"\nHD95 of the {pair['pair']} pair under 0.5 s: {'yes' if pair['hd95_s'] < 0.5 else 'no'} "
                     f"({pair['hd95_s']:.2f} s CPU).")
    cmp = gui.get("compare_gui_thread")
    if cmp:
        lines.append(f"\nCompare's GUI-thread time per edit under 0.1 s: {'yes' if cmp['edit_s'] < 0.1 else 'no'} "
                     f"({cmp['edit_s']:.3f} s; Compare itself {cmp['compare_s']:.3f} s).")
    return lines


def _other_tables(result: dict) -> List[str]:
    lines = []
    speed = result.get("speed", {})
    if speed.get("layouts"):
        lines += ["", "### Inference settings: chosen against the alternatives (forward CPU s / slice)", "",
                  "| network | chosen | forward | other | forward | chosen is faster by |", "|---|---|---|---|---|---|"]
        for row in speed["layouts"]:
            lines.append(f"| {row['network']} | {row['chosen']} | {row['chosen_forward_s']:.3f} | {row['other']} | "
                         f"{row['other_forward_s']:.3f} | {row['speedup_of_chosen']:.2f}x |")
    if result.get("threads"):
        lines += ["", "### Threads on a shared CPU (U-Net base 16, batch 4, 256x256; median of child processes)", "",
                  "| setting | wall s | CPU s | load |", "|---|---|---|---|"]
        lines += [f"| {r['policy']} | {_f(r['wall_s'], 3)} | {_f(r['cpu_s'], 3)} | {r['load']} |" for r in result["threads"]]
    gui = result.get("gui", {})
    if gui.get("pairs"):
        lines += ["", "### GUI metrics (200 x 512 x 512, fastest CPU s)", "",
                  "| pair | HD95 mm (k-d tree) | s | former dense EDT: mm | s | ratio metrics (one count) s | "
                  "five counts (former) s | overlay + per-slice counts s |", "|---|---|---|---|---|---|---|---|"]
        for p in gui["pairs"]:
            lines.append(f"| {p['pair']} | {p['hd95_mm']:.4f} | {p['hd95_s']:.2f} | {p['hd95_former_mm']:.4f} | "
                         f"{p['hd95_former_s']:.2f} | {p['region_metrics_s']:.3f} | {p['five_counts_s']:.3f} | "
                         f"{p['compare_masks_s']:.3f} |")
    for key, title in (("compile", "torch.compile (opt-in)"), ("onnx", "ONNX Runtime")):
        if speed.get(key):
            lines += ["", f"### {title}", "", "```", *[json.dumps(r) for r in speed[key]], "```"]
    return lines


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Inference speed and memory against peers (issue 13)", "",
             f"`python -m benchmarks.speed` on {m['date']}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} PyTorch thread(s). Load average {result['load_start'][0]:.1f} at the start, "
             f"{result['load_end'][0]:.1f} at the end.", "",
             ("**The machine was shared** (the load average was above its core count): wall times include "
              "waiting for a core; the CPU times (one thread) are the better measure, and still somewhat slower than "
              "on an idle machine (shared caches and memory bandwidth). " if max(result["load_start"][0], result["load_end"][0])
              > m["cores"] else "Other work ran at times on the machine: the CPU times (one thread) are the measure. ")
             + "Peak memory is resident memory and does not depend on the load.", "", "Shipped weights at the time of the run: " + "; ".join(
                 f"{k}: {v['domain']}, " + (f"in-plane {tuple(v['inplane_size'])}" if v["inplane_size"] else
                                            f"spacing {tuple(v['target_spacing'] or ())}")
                 for k, v in result["shipped"].items()) + "."]
    speed = result.get("speed")
    memory = {r["name"]: r for r in result.get("memory", [])}
    if speed:
        peak = speed["conv_peak"]
        lines += ["", f"CT: {speed['ct']}. Conv peak: {peak['gflops_per_s']:.1f} GFLOP/s ({peak.get('layer', '')}).", "",
                  *_speed_table(speed, memory)]
        for name, why in speed.get("missing_peers", {}).items():
            lines.append(f"\n{name}: {why}")
    if memory:
        lines += ["", "### Peak memory (resident memory a run adds, own process per run)", "",
                  "| pipeline | measured (slices: MB) | bytes per CT voxel | fixed MB | 512x512x300 | measured on |",
                  "|---|---|---|---|---|---|"]
        for name, row in memory.items():
            measured = ", ".join(f"{k}: {v['added_mb']:.0f}" for k, v in row["measured"].items())
            lines.append(f"| {name} | {measured} | {_f(row.get('bytes_per_voxel'), 1)} | {_f(row.get('fixed_mb'), 0)} | "
                         f"{_memory_text(row)} | {row.get('date', m['date'])} |")
    lines += ["", "## Targets", "", *_targets(result), *_other_tables(result), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
