"""CHS-Net: cascade wiring, RAIU-Net parts, loss, and a tiny overfit on one phantom slice (small widths)."""

import numpy as np
import pytest
import torch

from napari_covidseg.models import get_network
from napari_covidseg.models.chs_net import (
    CHSNet,
    CHSNetLoss,
    RAIUNet,
    ResidualInceptionBlock,
    SpectralSpatialDepthAttention,
    stage_widths,
)
from napari_covidseg.preprocessing import preprocess
from network_helpers import hard_dice_per_class


def _phantom_slice(size=(64, 64), seed=1):
    from napari_covidseg.phantom import make_phantom

    ph = make_phantom(shape=(8,) + size, spacing=(5.0, 320.0 / size[0], 320.0 / size[1]), seed=seed,
                      infection_fraction=0.15)
    k = int(np.argmax(ph.infection.sum(axis=(1, 2))))
    spec = get_network("chs_net")
    x = torch.from_numpy(np.asarray(preprocess(ph.ct[k], spec.preprocessing), dtype=np.float32))[None, None]
    target = torch.from_numpy(np.stack([ph.lung[k] > 0, ph.infection[k] > 0]).astype(np.float32))[None]
    return x, target


def test_spec_is_registered_with_paper_recipe():
    spec = get_network("chs_net")
    assert spec.dims == 2 and spec.stride == 16 and spec.recipe.input_size == (256, 256)
    assert spec.recipe.batch_size == 8
    assert spec.preprocessing.inplane_size == (256, 256)


def test_widths_grow_by_one_and_a_half():
    assert stage_widths(32, 4) == [32, 48, 72, 108, 162]
    net = RAIUNet(base=8, depth=4)
    assert [e.shortcut[-1].num_features for e in net.encoders] == stage_widths(8, 4)


def test_default_size_is_close_to_the_papers_4_2_million():
    n = sum(p.numel() for p in get_network("chs_net").create().parameters())
    assert 3.8e6 < n < 4.6e6, n


@pytest.mark.parametrize("size", [(250, 250), (97, 131)])
def test_output_shape_for_odd_sizes(size):
    torch.manual_seed(0)
    model = CHSNet(base=4).eval()
    with torch.no_grad():
        out = model(torch.randn((1, 1) + size))
    assert out["logits"].shape == (1, 2) + size
    assert out["infection_raw_logits"].shape == (1, 1) + size
    assert torch.isfinite(out["logits"]).all()


def test_infection_is_restricted_to_the_lung_at_inference_only():
    torch.manual_seed(0)
    model = CHSNet(base=4)
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
    lung, infection = out["logits"][:, 0], out["logits"][:, 1]
    raw = out["infection_raw_logits"][:, 0]
    assert torch.equal(infection, torch.minimum(raw, lung))
    assert not bool(((infection > 0) & (lung <= 0)).any())  # no infection outside the predicted lung
    model.restrict_to_lung = False
    with torch.no_grad():
        assert torch.equal(model(x)["logits"][:, 1], raw)
    model.restrict_to_lung = True
    model.train()
    out = model(x)
    assert torch.equal(out["logits"][:, 1:], out["infection_raw_logits"])


def test_each_net_learns_only_from_its_own_target():
    """With the lung map detached, the infection loss does not reach the lung net, and vice versa."""
    torch.manual_seed(0)
    model = CHSNet(base=4).train()
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    out["logits"][:, 1].sum().backward()

    def untouched(net):  # the cat() backward sends exact zeros to the other branch
        return all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in net.parameters())

    assert untouched(model.lung_net)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.infection_net.parameters())
    model.zero_grad(set_to_none=True)
    model(x)["logits"][:, 0].sum().backward()
    assert untouched(model.infection_net)
    assert not untouched(model.lung_net)


def test_infection_net_sees_the_lung_map():
    model = CHSNet(base=4)
    assert model.infection_net.encoders[0].shortcut[0].in_channels == 2
    assert model.lung_net.encoders[0].shortcut[0].in_channels == 1


def test_attention_and_block_shapes():
    torch.manual_seed(0)
    att = SpectralSpatialDepthAttention(skip_channels=6, gate_channels=9)
    x, g = torch.randn(2, 6, 16, 12), torch.randn(2, 9, 8, 6)
    y = att(x, g)
    assert y.shape == x.shape
    # both attentions are sigmoid gates: the output can only shrink the skip's magnitude
    assert bool((y.abs() <= x.abs() + 1e-6).all())
    block = ResidualInceptionBlock(3, 8)
    assert block(torch.randn(2, 3, 16, 16)).shape == (2, 8, 16, 16)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = CHSNet(base=4).train()
    x, target = _phantom_slice((48, 48))
    x, target = torch.cat([x, x.flip(-1)]), torch.cat([target, target.flip(-1)])
    loss, terms = CHSNetLoss()(model(x), target, 0.5)
    assert set(terms) == {"bce", "dice"}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_loss_is_minimal_at_the_ground_truth():
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 32, 32) > 0.7).float()
    loss_fn = CHSNetLoss()
    perfect, _ = loss_fn({"logits": (2 * target - 1) * 12.0}, target)
    assert float(perfect) < 1e-3
    for scale in (0.5, 2.0):
        noisy = (2 * target - 1) * 12.0 + torch.randn_like(target) * 12.0 * scale
        assert float(loss_fn({"logits": noisy}, target)[0]) > float(perfect)
    # the two terms are weighted 0.5 / 0.5 as in the paper
    logits = torch.randn_like(target)
    total, terms = loss_fn({"logits": logits}, target)
    assert abs(float(total) - 0.5 * (terms["bce"] + terms["dice"])) < 1e-5


def test_tiny_overfit_on_one_phantom_slice():
    torch.manual_seed(0)
    model = CHSNet(base=6).train()
    x, target = _phantom_slice((48, 48))
    loss_fn = CHSNetLoss()
    with torch.no_grad():
        start = float(hard_dice_per_class(model(x)["logits"], target).mean())
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    # a step budget, not a time budget, so a busy machine cannot make the test fail
    best, steps = start, 0
    while steps < 80:
        for _ in range(5):
            optimiser.zero_grad()
            loss_fn(model(x), target)[0].backward()
            optimiser.step()
            steps += 1
        with torch.no_grad():
            dice = hard_dice_per_class(model(x)["logits"], target)
        best = max(best, float(dice.mean()))
        if best > start + 0.35:
            break
    assert best > start + 0.3, f"mean Dice {start:.2f} -> {best:.2f} after {steps} steps"
