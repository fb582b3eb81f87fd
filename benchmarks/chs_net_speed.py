"""CPU speed of CHS-Net: forward pass and training step, per sample, of the shipped variant.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/chs_net_speed.py [--sizes 256 160] [--batch 4]
        [--repeats 3] [--threads 1] [--channels-last] [--base 16]

(``--channels-last`` converts model and input first; the network runs channels-last inside
anyway since the CPU speed-up, so it only matters for older checkouts.)

Forward: ``model.eval()`` under ``torch.inference_mode()``.  Training step: ``model.train()``,
forward, :class:`CHSNetLoss`, backward and one Adam step (``zero_grad(set_to_none=True)`` first),
as the trainer does.  Each is warmed up once, then timed ``--repeats`` times; times are divided
by the batch size.  Printed: the median wall time, the median and the fastest process CPU time.
With one thread the CPU time is the compute time, while the wall time grows with the machine's
load (the script prints the 1-minute load average before and after).  Results of the CPU
speed-up: ``benchmarks/results/chs_net_speed.md``.

The script imports ``napari_covidseg`` from ``sys.path``, so the same file can time another
checkout of the package (``PYTHONPATH=/path/to/old/checkout python benchmarks/chs_net_speed.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def step_seconds(step, repeats: int) -> tuple:
    """(median wall time, median CPU time, fastest CPU time) of ``step()`` over ``repeats`` runs, after a warm-up.

    With one thread the CPU time is the compute time; the wall time also holds the time the
    process waited for a core, which on a loaded machine can be much longer.  Other processes
    still slow the CPU time down (shared caches and memory bandwidth), least so in the fastest run.
    """
    step()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), min(cpu)


def time_forward(model, x, repeats: int) -> tuple:
    """(wall, CPU, fastest CPU) seconds per sample of an inference forward pass."""
    model.eval()

    def step():
        with torch.inference_mode():
            model(x)

    return tuple(t / x.shape[0] for t in step_seconds(step, repeats))


def time_train_step(model, x, target, repeats: int) -> tuple:
    """(wall, CPU, fastest CPU) seconds per sample of forward + loss + backward + Adam step."""
    from napari_covidseg.models.chs_net import CHSNetLoss

    model.train()
    loss_fn = CHSNetLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), target)
        loss.backward()
        optimiser.step()

    return tuple(t / x.shape[0] for t in step_seconds(step, repeats))


def measure(size: int, batch: int, base: int, repeats: int, channels_last: bool) -> dict:
    """Forward and training-step seconds per sample of ``CHSNet(base)`` at ``size x size``."""
    from napari_covidseg.models.chs_net import CHSNet

    torch.manual_seed(0)
    model = CHSNet(base=base)
    x = torch.rand(batch, 1, size, size)
    target = (torch.rand(batch, 2, size, size) > 0.7).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return {"size": size, "forward_s": time_forward(model, x, repeats),
            "train_step_s": time_train_step(model, x, target, repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 160])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--base", type=int, default=16, help="CHSNet width (shipped variant: 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import napari_covidseg

    print(f"package {os.path.dirname(napari_covidseg.__file__)}; torch {torch.__version__}, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, batch {args.batch}, base {args.base}, "
          f"{'channels_last' if args.channels_last else 'contiguous'} input, {args.repeats} timed runs", flush=True)
    load_before = os.getloadavg()[0]
    for size in args.sizes:
        row = measure(size, args.batch, args.base, args.repeats, args.channels_last)
        parts = [f"{name} {wall * 1e3:6.0f} ms/sample (CPU median {cpu * 1e3:6.0f}, min {fastest * 1e3:6.0f})"
                 for name, (wall, cpu, fastest) in (("forward", row["forward_s"]), ("training step", row["train_step_s"]))]
        print(f"{size}x{size}: " + ", ".join(parts), flush=True)
    print(f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
