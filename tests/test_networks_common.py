"""The registry contract, checked for every registered network.

Each network is built with its spec's ``shipped_kwargs`` (the small variant), so the whole file
stays fast on a 2-core CPU.  The checks: output shape for odd input sizes, gradients reaching
every parameter through the network's own loss, the loss preferring perfect logits, checkpoint
round trips, and a tiny overfit on one phantom slice (2D) or patch (3D).
"""

import numpy as np
import pytest
import torch

from napari_covidseg.checkpoint import load_checkpoint, save_checkpoint
from napari_covidseg.models import get_network, network_names
from napari_covidseg.preprocessing import preprocess
from network_helpers import hard_dice_per_class

NETWORKS = network_names()
ODD_SIZE = {2: (250, 250), 3: (20, 44, 36)}
SMALL_SIZE = {2: (32, 32), 3: (16, 32, 32)}  # batch 2: BatchNorm works even at a 1x1 bottleneck
OVERFIT_SIZE = {2: (48, 48), 3: (16, 32, 32)}  # batch 1: the multi-scale networks need 48 px


def _build(name, seed=0):
    spec = get_network(name)
    torch.manual_seed(seed)
    return spec, spec.create(**spec.shipped_kwargs)


def _phantom_sample(spec, size, seed=0):
    """(input, target) from the phantom: one slice (2D) or one patch (3D), batch of 1."""
    from napari_covidseg.phantom import make_phantom

    if spec.dims == 2:
        ph = make_phantom(shape=(8,) + size, spacing=(5.0, 320.0 / size[0], 320.0 / size[1]), seed=seed,
                          infection_fraction=0.15)
        k = int(np.argmax(ph.infection.sum(axis=(1, 2))))
        ct, lung, infection = ph.ct[k], ph.lung[k], ph.infection[k]
    else:
        ph = make_phantom(shape=size, spacing=(300.0 / size[0], 320.0 / size[1], 320.0 / size[2]), seed=seed,
                          infection_fraction=0.15)
        ct, lung, infection = ph.ct, ph.lung, ph.infection
    x = torch.from_numpy(np.asarray(preprocess(ct, spec.preprocessing), dtype=np.float32))[None, None]
    target = torch.from_numpy(np.stack([lung > 0, infection > 0]).astype(np.float32))[None]
    return x, target


def test_registry_has_networks():
    assert "unet" in NETWORKS
    for name in NETWORKS:
        spec = get_network(name)
        assert spec.name == name and spec.dims in (2, 3) and spec.stride >= 1
        assert len(spec.recipe.input_size) == spec.dims


@pytest.mark.parametrize("name", NETWORKS)
def test_output_shape_for_odd_sizes(name):
    spec, model = _build(name)
    model.eval()
    size = ODD_SIZE[spec.dims]
    with torch.no_grad():
        out = model(torch.randn((1, 1) + size))
    assert isinstance(out, dict) and "logits" in out
    assert tuple(out["logits"].shape) == (1, 2) + size
    assert torch.isfinite(out["logits"]).all()


@pytest.mark.parametrize("name", NETWORKS)
def test_gradients_reach_every_parameter(name):
    spec, model = _build(name)
    model.train()
    x, target = _phantom_sample(spec, SMALL_SIZE[spec.dims])
    x, target = torch.cat([x, x.flip(-1)]), torch.cat([target, target.flip(-1)])  # batch 2 for BatchNorm
    loss, terms = spec.loss()(model(x), target, 0.5)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert isinstance(terms, dict) and all(isinstance(v, float) for v in terms.values())
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None]
    assert not no_grad, f"parameters not reached by the loss: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    # a bias right before a BatchNorm gets an exactly zero gradient; anything more is a dead branch
    assert len(zero) <= 0.1 * len(params), f"zero gradients: {zero[:5]}"


@pytest.mark.parametrize("name", NETWORKS)
def test_loss_prefers_perfect_logits(name):
    spec, model = _build(name)
    model.train()
    x, target = _phantom_sample(spec, SMALL_SIZE[spec.dims])
    x, target = torch.cat([x, x.flip(-1)]), torch.cat([target, target.flip(-1)])
    with torch.no_grad():
        outputs = model(x)
        loss_fn = spec.loss()
        perfect = dict(outputs, logits=(2 * target - 1) * 12.0)
        torch.manual_seed(1)
        noisy = dict(outputs, logits=torch.randn_like(target) * 3.0)
        for progress in (0.0, 0.5, 1.0):
            good, _ = loss_fn(perfect, target, progress)
            bad, _ = loss_fn(noisy, target, progress)
            assert float(good) < float(bad), (progress, float(good), float(bad))


@pytest.mark.parametrize("name", NETWORKS)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    spec, model = _build(name, seed=3)
    model.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their defaults
        model(torch.randn((2, 1) + SMALL_SIZE[spec.dims]))
    model.eval()
    path = save_checkpoint(tmp_path / f"{name}.pt", model, name, spec.shipped_kwargs, metrics={"val_dice_mean": 0.5})
    loaded = load_checkpoint(path, expected_network=name)
    assert loaded.spec is spec and not loaded.model.training
    x = torch.randn((1, 1) + SMALL_SIZE[spec.dims])
    with torch.no_grad():
        a, b = model(x)["logits"], loaded.model(x)["logits"]
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_overfit_on_one_phantom_sample(name):
    """A few seconds of Adam on one slice/patch must clearly raise its Dice (lung, infection)."""
    spec, model = _build(name, seed=0)
    x, target = _phantom_sample(spec, OVERFIT_SIZE[spec.dims], seed=1)
    loss_fn = spec.loss()
    model.train()  # judged with batch statistics: a few dozen steps are too few for running means

    def dice_now():
        with torch.no_grad():
            return hard_dice_per_class(model(x)["logits"], target)

    start = float(dice_now().mean())
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    # a step budget, not a time budget, so a busy machine cannot make the test fail; every network
    # so far needs 5-20 steps (CHS-Net, whose infection branch learns last, about 15)
    best, steps, max_steps = start, 0, 40
    while steps < max_steps:
        for _ in range(5):
            optimiser.zero_grad()
            loss, _ = loss_fn(model(x), target, min(1.0, steps / max_steps))
            loss.backward()
            optimiser.step()
            steps += 1
        dice = dice_now()
        best = max(best, float(dice.mean()))
        if best > start + 0.3:
            break
    assert best > start + 0.3, f"{name}: mean Dice {start:.2f} -> {best:.2f} after {steps} steps"
