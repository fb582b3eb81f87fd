"""Loss terms shared by several networks (each network's own loss combines them in its module)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per (sample, channel), averaged; logits read through a sigmoid."""
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * soft Dice`` over both sigmoid channels."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, outputs: dict, target: torch.Tensor, progress: float = 0.0):
        logits = outputs["logits"]
        bce = bce_loss(logits, target)
        dice = soft_dice_loss(logits, target)
        total = self.bce_weight * bce + self.dice_weight * dice
        return total, {"bce": float(bce.detach()), "dice": float(dice.detach())}
