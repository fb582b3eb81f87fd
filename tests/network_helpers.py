"""Helpers shared by the network tests."""

import torch

from napari_covidseg.checkpoint import LoadedModel
from napari_covidseg.models import get_network
from napari_covidseg.preprocessing import Preprocessing


def hard_dice_per_class(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of the thresholded logits (> 0) per class, averaged over the batch; 2D or 3D."""
    pred = (logits > 0).float()
    dims = tuple(range(2, logits.ndim))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    return ((2 * inter + 1e-6) / (denom + 1e-6)).mean(0)


def loaded_network(network: str, preprocessing: Preprocessing, **kwargs) -> LoadedModel:
    """A freshly built ``network`` (random weights, seed 0, eval mode) as a loaded checkpoint would give it."""
    torch.manual_seed(0)
    spec = get_network(network)
    return LoadedModel(model=spec.create(**kwargs).eval(), spec=spec, network=network, network_kwargs=kwargs,
                       preprocessing=preprocessing)
