"""How benchmarks/train_real_weights.py configures a run (no training here)."""

import pytest

from benchmarks.train_real_weights import AUGMENT_2D, run_config
from napari_covidseg.models import get_network


def test_the_3d_network_trains_with_the_low_resolution_transform_too(tmp_path):
    config = run_config("qchc_unet3d", "gpu", "cuda", out=tmp_path / "run", time_budget=5)
    assert list(config.augmentation) == list(get_network("qchc_unet3d").recipe.augmentation) + ["lowres"]
    assert list(run_config("unet", "gpu", "cuda", out=tmp_path / "run2", time_budget=5).augmentation) == AUGMENT_2D


@pytest.mark.parametrize("network", ["unet", "qchc_unet3d"])
def test_the_gpu_recipe_on_the_cpu_keeps_the_cores_for_compute(tmp_path, network):
    on_gpu = run_config(network, "gpu", "cuda", threads=1, out=tmp_path / "gpu", time_budget=5)
    on_cpu = run_config(network, "gpu", "cpu", threads=1, out=tmp_path / "cpu", time_budget=5)
    assert on_gpu.num_workers > 0
    assert on_cpu.num_workers == 0 and on_cpu.threads == 1
