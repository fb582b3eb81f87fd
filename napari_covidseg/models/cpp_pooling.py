"""Class-probability-preserving (CPP) pooling: per s x s cell, the fraction of pixels of each class.

Why: the MSA-CPP U-Net supervises its coarse auxiliary heads with a down-sampled ground truth.
Nearest or max down-sampling of a label map throws away small lesions or inflates them; averaging
the one-hot map instead keeps, in each coarse cell, the exact class proportions, which is a proper
probability distribution the auxiliary softmax can be compared with (KL divergence).

Sizes that are not multiples of ``s``: the last row/column of cells is partial.  The map is padded
with zeros at the bottom/right to a multiple of ``s`` and each cell's class sums are divided by
the number of *real* pixels in the cell (pad-then-pool with a count of valid pixels, equivalent to
``avg_pool2d(..., ceil_mode=True, count_include_pad=False)``), so every cell still sums to one.
The output has ``ceil(H / s) x ceil(W / s)`` cells, aligned with the top-left corner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpp_pool(onehot: torch.Tensor, s: int) -> torch.Tensor:
    """Class fractions per ``s x s`` cell of a ``(B, C, H, W)`` one-hot (or soft) class map."""
    if onehot.ndim != 4:
        raise ValueError(f"cpp_pool expects a (B, C, H, W) map, got shape {tuple(onehot.shape)}")
    s = int(s)
    if s < 1:
        raise ValueError(f"cpp_pool cell size must be >= 1, got {s}")
    if s == 1:
        return onehot.float()
    h, w = onehot.shape[2:]
    pad_h, pad_w = (-h) % s, (-w) % s
    x = F.pad(onehot.float(), (0, pad_w, 0, pad_h))
    sums = F.avg_pool2d(x, s) * (s * s)
    valid = F.pad(onehot.new_ones((1, 1, h, w), dtype=torch.float32), (0, pad_w, 0, pad_h))
    counts = F.avg_pool2d(valid, s) * (s * s)
    return sums / counts


def exclusive_classes(target: torch.Tensor) -> torch.Tensor:
    """Turn the multi-label (lung, infection) target into 3 mutually exclusive one-hot classes.

    ``(B, 2, H, W)`` in {0, 1} -> ``(B, 3, H, W)``: background, lung without infection, infection.
    Infection counts as infection even where a label has it outside the lung, so the three always
    sum to one.
    """
    lung, infection = target[:, 0:1].float(), target[:, 1:2].float()
    lung_only = lung * (1.0 - infection)
    background = (1.0 - lung) * (1.0 - infection)
    return torch.cat([background, lung_only, infection], dim=1)


def kl_to_prediction(target_prob: torch.Tensor, pred_log_prob: torch.Tensor, cell_weight=None) -> torch.Tensor:
    """Mean over cells of KL(target || prediction) = sum_c t_c (log t_c - log p_c), with 0 log 0 = 0.

    ``cell_weight`` ``(B, 1, h, w)`` (e.g. the CPP-pooled fraction of labelled pixels) weights the
    cells; cells of weight 0 add nothing.
    """
    t = target_prob
    log_t = torch.log(t.clamp_min(1e-12))
    per_cell = (t * (log_t - pred_log_prob)).sum(dim=1)
    if cell_weight is None:
        return per_cell.mean()
    w = cell_weight[:, 0].to(per_cell.dtype)
    return (per_cell * w).sum() / w.sum().clamp_min(1.0)
