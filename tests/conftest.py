"""Shared test configuration."""

import os

import pytest

# One torch thread: the networks in the tests are tiny, so a second thread buys little, and on a
# 2-core CI machine that also runs Xvfb and napari, oversubscription made CPU runs up to 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data_dir():
    """Path of ../shared/data (real public CT); skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA) or not os.listdir(SHARED_DATA):
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


# --- tiny checkpoints for the Segment / Side-by-side widget tests (appended by the widgets' author) ---
TINY_SHAPE = (12, 48, 48)
TINY_SPACING = (6.0, 3.3, 3.3)


@pytest.fixture(scope="session")
def tiny_unet_checkpoints(tmp_path_factory):
    """Two small ``unet`` checkpoints: ``"trained"`` (40 Adam steps on a phantom; its lung mask
    overlaps the ground truth) and ``"random"`` (untrained), both without in-plane resizing so
    they run in a fraction of a second on 2 CPU cores."""
    import numpy as np
    import torch

    from napari_covidseg.checkpoint import save_checkpoint
    from napari_covidseg.models import get_network
    from napari_covidseg.phantom import make_phantom
    from napari_covidseg.preprocessing import Preprocessing, preprocess

    spec = get_network("unet")
    pre = Preprocessing(hu_min=-1250.0, hu_max=250.0, normalisation="minmax", inplane_size=None)
    kwargs = {"base": 4, "depth": 2}
    folder = tmp_path_factory.mktemp("tiny_checkpoints")
    torch.manual_seed(0)
    random_model = spec.create(**kwargs).eval()
    random_path = save_checkpoint(folder / "random.pt", random_model, "unet", kwargs, preprocessing=pre,
                                  training={"data": "none (random init)"})
    torch.manual_seed(0)
    model = spec.create(**kwargs)
    phantom = make_phantom(shape=TINY_SHAPE, spacing=TINY_SPACING, seed=1)
    x = torch.from_numpy(preprocess(phantom.ct, pre))[:, None]
    y = torch.from_numpy(np.stack([phantom.lung, phantom.infection], 1)).float()
    loss_fn = spec.loss()
    optimizer = torch.optim.Adam(model.parameters(), 2e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x), (4,), generator=generator)
        loss, _ = loss_fn(model(x[idx]), y[idx], 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    trained_path = save_checkpoint(folder / "trained.pt", model, "unet", kwargs, preprocessing=pre,
                                   training={"data": "phantom", "n_cases": 1, "epochs": 1},
                                   metrics={"lung": {"dice": 0.9}, "infection": {"dice": 0.1}})
    return {"trained": str(trained_path), "random": str(random_path)}


@pytest.fixture
def tiny_phantom():
    """A small phantom CT with lung and infection ground truth (seed 0, not the training seed)."""
    from napari_covidseg.phantom import make_phantom

    return make_phantom(shape=TINY_SHAPE, spacing=TINY_SPACING, seed=0)


@pytest.fixture
def isolated_catalog(tmp_path, monkeypatch):
    """The weights catalog reading and writing a fresh config folder."""
    from napari_covidseg import weights_catalog

    monkeypatch.setenv("COVIDSEG_CONFIG_DIR", str(tmp_path / "config"))
    weights_catalog.reset()
    yield weights_catalog
    weights_catalog.reset()

# Tests never read or write the user's real list of checkpoints (~/.config/napari-covidseg).
import tempfile as _tempfile  # noqa: E402

os.environ.setdefault("COVIDSEG_CONFIG_DIR", _tempfile.mkdtemp(prefix="covidseg-test-config-"))
