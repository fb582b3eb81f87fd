"""QC-HC 3D U-Net: shapes, quick connections, hypercolumns, Tversky+BCE loss, tiny overfit on a phantom patch."""

import numpy as np
import pytest
import torch

from napari_covidseg.models import get_network
from napari_covidseg.models.qchc_unet3d import QCHCUNet3D, QuickConnectionBlock, TverskyCELoss, tversky_loss
from napari_covidseg.models.unet import crop_to, pad_to_multiple
from napari_covidseg.preprocessing import preprocess
from network_helpers import hard_dice_per_class


def _phantom_patch(size=(16, 32, 32), seed=1):
    from napari_covidseg.phantom import make_phantom

    ph = make_phantom(shape=size, spacing=(300.0 / size[0], 320.0 / size[1], 320.0 / size[2]), seed=seed,
                      infection_fraction=0.15)
    spec = get_network("qchc_unet3d")
    x = torch.from_numpy(np.asarray(preprocess(ph.ct, spec.preprocessing), dtype=np.float32))[None, None]
    target = torch.from_numpy(np.stack([ph.lung > 0, ph.infection > 0]).astype(np.float32))[None]
    return x, target


def test_spec_follows_the_paper():
    spec = get_network("qchc_unet3d")
    assert spec.dims == 3 and spec.stride == 16
    assert spec.recipe.input_size == (80, 160, 160) and spec.recipe.lr == 1e-4 and spec.recipe.schedule == "plateau"
    assert spec.preprocessing.normalisation == "zscore"
    assert spec.preprocessing.target_spacing == (2.70, 1.58, 1.58)
    assert (spec.preprocessing.hu_min, spec.preprocessing.hu_max) == (-1250.0, 250.0)
    assert spec.recipe.extra["augmentation_p"] == 0.15 and len(spec.recipe.augmentation) == 8


def test_default_widths_run_from_32_to_512():
    model = get_network("qchc_unet3d").create()
    assert [e.first[0].out_channels for e in model.encoders] == [32, 64, 128, 256, 512]
    assert len(model.hypercolumn_heads) == 4


def test_pad_and_crop_work_in_3d():
    x = torch.randn(1, 2, 20, 50, 45)
    padded, crop = pad_to_multiple(x, 16)
    assert padded.shape == (1, 2, 32, 64, 48)
    assert torch.equal(crop_to(padded, crop), x)


@pytest.mark.parametrize("size", [(20, 50, 45), (16, 32, 32), (5, 40, 24)])
def test_output_shape_for_odd_sizes(size):
    torch.manual_seed(0)
    model = QCHCUNet3D(base=4).eval()
    with torch.no_grad():
        out = model(torch.randn((1, 1) + size))
    assert out["logits"].shape == (1, 2) + size
    assert torch.isfinite(out["logits"]).all()


def test_anisotropic_pooling_for_thin_patches():
    torch.manual_seed(0)
    model = QCHCUNet3D(base=4, pool_z_levels=2).eval()
    assert model.pool_kernels == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    with torch.no_grad():
        out = model(torch.randn(1, 1, 4, 32, 48))
    assert out["logits"].shape == (1, 2, 4, 32, 48)
    with pytest.raises(ValueError, match="pool_z_levels"):
        QCHCUNet3D(base=4, pool_z_levels=5)


def test_quick_connection_block_sums_first_and_last_and_concatenates_input():
    torch.manual_seed(0)
    block = QuickConnectionBlock(3, 5).eval()
    x = torch.randn(1, 3, 4, 6, 6)
    with torch.no_grad():
        y = block(x)
        a = block.first(x)
        expected = torch.relu(a + block.last(a))
    assert y.shape == (1, 8, 4, 6, 6)
    assert torch.equal(y[:, :3], x)
    assert torch.allclose(y[:, 3:], expected)


def test_logits_are_the_sum_of_the_upsampled_hypercolumn_scores():
    """Zeroing every head but the finest one leaves only the full-resolution level's scores."""
    torch.manual_seed(0)
    model = QCHCUNet3D(base=4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        full = model(x)["logits"]
        for head in model.hypercolumn_heads[:-1]:
            head.weight.zero_()
            head.bias.zero_()
        finest_only = model(x)["logits"]
    assert not torch.allclose(full, finest_only)  # the coarse levels did contribute
    assert torch.isfinite(finest_only).all()


def test_tversky_with_half_weights_is_soft_dice_and_asymmetric_weights_matter():
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 4, 8, 8) > 0.6).float()
    logits = torch.randn_like(target) * 2
    prob = torch.sigmoid(logits)
    dims = (2, 3, 4)
    # Tversky's smoothing eps=1 on TP matches Dice's eps=2 on 2 TP
    dice = (2 * (prob * target).sum(dims) + 2) / (prob.sum(dims) + target.sum(dims) + 2)
    assert torch.allclose(tversky_loss(logits, target), (1 - dice).mean(), atol=1e-6)
    # all-foreground prediction: only false positives, which alpha weighs
    ones = torch.full_like(target, 10.0)
    assert float(tversky_loss(ones, target, alpha=0.9, beta=0.1)) > float(tversky_loss(ones, target, 0.1, 0.9))


def test_loss_is_minimal_at_the_ground_truth():
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 4, 8, 8) > 0.7).float()
    loss_fn = TverskyCELoss()
    perfect, terms = loss_fn({"logits": (2 * target - 1) * 12.0}, target)
    assert set(terms) == {"tversky", "bce"} and float(perfect) < 1e-3
    for scale in (0.5, 2.0):
        noisy = (2 * target - 1) * 12.0 + torch.randn_like(target) * 12.0 * scale
        assert float(loss_fn({"logits": noisy}, target)[0]) > float(perfect)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = QCHCUNet3D(base=4).train()
    x, target = _phantom_patch((16, 32, 32))
    x, target = torch.cat([x, x.flip(-1)]), torch.cat([target, target.flip(-1)])
    loss, _ = TverskyCELoss()(model(x), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    zero = [n for n, p in model.named_parameters() if not float(p.grad.abs().sum()) > 0]
    assert not zero, zero[:5]


def test_tiny_overfit_on_one_phantom_patch():
    torch.manual_seed(0)
    model = QCHCUNet3D(base=4).train()
    x, target = _phantom_patch((16, 32, 32))
    loss_fn = TverskyCELoss()
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
