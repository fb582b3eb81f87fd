"""Loss terms shared by several networks (each network's own loss combines them in its module).

Every term takes an optional ``weight`` broadcastable to the target ``(B, C, ...)``: 1 where the
label is known, 0 where it is not (a case without a lung mask, a channel not being trained, the
padding of a thin volume).  Masked voxels add nothing to the loss and no gradient; a
(sample, channel) with no known voxel is left out of the per-channel averages instead of counting
as a perfect or a failed prediction.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def full_weight(weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``weight`` expanded to ``like``'s shape (ones when ``None``)."""
    if weight is None:
        return torch.ones_like(like)
    return weight.to(like.dtype).expand_as(like)


def weighted_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` over the voxels with weight > 0 (0 when there are none)."""
    if weight is None:
        return values.mean()
    w = full_weight(weight, values)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def mean_over_labelled(per_channel: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of a ``(B, C)`` per-(sample, channel) loss over the pairs that have any known voxel."""
    if weight is None:
        return per_channel.mean()
    dims = tuple(range(2, weight.ndim))
    known = (weight.amax(dim=dims) > 0).to(per_channel.dtype).expand_as(per_channel) if dims else \
        (weight > 0).to(per_channel.dtype).expand_as(per_channel)
    return (per_channel * known).sum() / known.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - soft Dice per (sample, channel) over the known voxels, averaged; logits read through a sigmoid."""
    prob = torch.sigmoid(logits)
    w = full_weight(weight, prob)
    dims = tuple(range(2, logits.ndim))
    inter = (w * prob * target).sum(dims)
    denom = (w * prob).sum(dims) + (w * target).sum(dims)
    return mean_over_labelled(1.0 - (2.0 * inter + eps) / (denom + eps), weight)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy averaged over the known voxels."""
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    return weighted_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), weight)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * soft Dice`` over both sigmoid channels."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, outputs: dict, target: torch.Tensor, progress: float = 0.0, weight: Optional[torch.Tensor] = None):
        logits = outputs["logits"]
        bce = bce_loss(logits, target, weight)
        dice = soft_dice_loss(logits, target, weight=weight)
        total = self.bce_weight * bce + self.dice_weight * dice
        return total, {"bce": float(bce.detach()), "dice": float(dice.detach())}
