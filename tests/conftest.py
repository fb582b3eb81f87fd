"""Shared test configuration."""

import os

import pytest

# Keep CPU tests predictable on small CI machines (2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "2")

try:
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    pass

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data_dir():
    """Path of ../shared/data (real public CT); skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA) or not os.listdir(SHARED_DATA):
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
