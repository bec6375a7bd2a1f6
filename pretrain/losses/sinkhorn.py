"""Sinkhorn-Knopp equipartition over the samples of every rank (SwAV's codes, DINOv2's teacher centering)."""
from __future__ import annotations

import torch

from pretrain.comm import world_info
from pretrain.losses.distributed import all_reduce_sum_with_grad


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes [N, K] for this rank's scores [N, K] (cosines), equipartitioned over the samples of all ranks.

    Q = exp(scores / eps)^T [K, N]; Q /= sum(Q); then `iterations` times: each prototype row to 1/K (row
    sums all-reduced over ranks), each sample column to 1/B (B = N x world); finally columns sum to 1."""
    world = world_info()[1]
    Q = torch.exp((scores.double() - 1) / epsilon).t()            # [K, N]; the shift cancels in Q /= sum(Q)
    K, B = Q.shape[0], Q.shape[1] * world
    Q /= all_reduce_sum_with_grad(Q.sum())
    for _ in range(iterations):
        Q /= all_reduce_sum_with_grad(Q.sum(dim=1, keepdim=True))  # [K, 1]: per prototype, over all ranks
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)                           # [1, N]: per sample (its own rank)
        Q /= B
    return (Q * B).t().float()                                    # [N, K], rows sum to 1
