"""Peak memory of ``covidseg segment`` on one CT, run in a process of its own (by the memory tests
and ``benchmarks/speed.py``).

    python tests/memory_probe.py CT CHECKPOINT OUT_DIR [-- extra covidseg segment args]

Prints one JSON line: ``baseline_mb`` (resident memory before the run: Python, PyTorch and the
package imported), ``peak_mb`` (the process's peak resident memory, ``ru_maxrss``), ``added_mb``
= peak - baseline and ``seconds``.  Resident memory does not depend on how loaded the machine is.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def resident_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def segment(ct: str, checkpoint: str, out_dir: str, extra) -> None:
    from napari_covidseg import cli_segment

    status = cli_segment.main([ct, "--checkpoint", checkpoint, "--device", "cpu", "--out-dir", out_dir, "--quiet",
                               "--overwrite", *extra])
    if status != 0:
        raise SystemExit(f"covidseg segment exited with {status}")


def main(argv) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ct, checkpoint, out_dir = argv[:3]
    import torch  # noqa: F401 (part of the baseline)

    from napari_covidseg import cli_segment, inference  # noqa: F401 (part of the baseline)

    baseline = resident_mb()
    started = time.perf_counter()
    segment(ct, checkpoint, out_dir, extra)
    peak = peak_mb()
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "added_mb": peak - baseline,
                      "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(sys.argv[1:])
