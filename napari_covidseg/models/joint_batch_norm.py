"""One BatchNorm call for several ``nn.BatchNorm2d`` layers that normalise consecutive channel groups.

BatchNorm works channel by channel, so normalising ``cat(a, b)`` with the concatenated
parameters and statistics of ``bn_a`` and ``bn_b`` gives ``cat(bn_a(a), bn_b(b))``; the running
statistics that the single call updates are copied back into each layer, with each layer's
``num_batches_tracked`` counted as if it had been called itself.  CHS-Net's inception branches are
4 channels wide at full resolution, where one call on 16 channels is several times cheaper than
four on 4 (and the concatenation comes for free).  The layers and their ``state_dict`` stay as
they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _can_join(norms: Sequence[nn.Module]) -> bool:
    """Plain ``nn.BatchNorm2d`` layers with running statistics, affine and identical settings."""
    first = norms[0]
    return all(
        type(n) is nn.BatchNorm2d and n.affine and n.track_running_stats and n.momentum is not None
        and (n.eps, n.momentum, n.training) == (first.eps, first.momentum, first.training)
        for n in norms
    )


def joint_batch_norm(x: torch.Tensor, norms: Sequence[nn.Module]) -> torch.Tensor:
    """``cat([norm(part) for each norm's channels of x])`` computed as one BatchNorm call.

    Falls back to calling each layer on its channels when the layers cannot be joined (another
    BatchNorm class, no running statistics, cumulative averaging, mixed settings).
    """
    sizes = [n.num_features for n in norms]
    if not _can_join(norms):
        return torch.cat([n(part) for n, part in zip(norms, x.split(sizes, dim=1))], dim=1)
    first = norms[0]
    running_mean = torch.cat([n.running_mean for n in norms])
    running_var = torch.cat([n.running_var for n in norms])
    out = F.batch_norm(x, running_mean, running_var, torch.cat([n.weight for n in norms]),
                       torch.cat([n.bias for n in norms]), first.training, first.momentum, first.eps)
    if first.training:
        with torch.no_grad():
            for n, mean, var in zip(norms, running_mean.split(sizes), running_var.split(sizes)):
                n.running_mean.copy_(mean)
                n.running_var.copy_(var)
                n.num_batches_tracked.add_(1)
    return out
