"""Helpers shared by the network tests."""

import torch


def hard_dice_per_class(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of the thresholded logits (> 0) per class, averaged over the batch; 2D or 3D."""
    pred = (logits > 0).float()
    dims = tuple(range(2, logits.ndim))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    return ((2 * inter + 1e-6) / (denom + 1e-6)).mean(0)
