"""napari-covidseg: lung and COVID-19 infection segmentation of chest CT in napari.

Importing the package before PyTorch sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is
already set: PyTorch's OpenMP threads then sleep at once when they wait instead of spinning, which
keeps a multi-threaded forward pass from collapsing when other processes share the CPU (measured
in ``benchmarks/results/speed.md``).  OpenMP reads the variable once, when PyTorch loads it, so it
has no effect when PyTorch was imported first; set it yourself to choose another policy.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
