"""Contrastive losses: NT-Xent (SimCLR), InfoNCE against keys from all ranks (MoCo v3, CPC), and MoCo's queue loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.comm import world_info
from pretrain.losses.distributed import gather_no_grad, gather_with_grad


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR loss for two views of the same B local samples.

    z1, z2: [B, D] projections of view 1 and view 2 on this rank. Both are gathered (with
    gradients) from all W ranks, so each of the 2B local anchors is contrasted against 2*W*B - 2
    negatives. Returns the mean loss over this rank's 2B anchors; averaging over ranks (as DDP does
    for gradients) gives exactly the single-process loss on the global batch.
    """
    rank, world = world_info()
    B = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    # keys: [2*W*B, D] laid out as [view1 of all ranks; view2 of all ranks]
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], 0)
    N = world * B
    queries = torch.cat([z1, z2], 0)                                   # [2B, D]
    logits = queries @ keys.t() / temperature                          # [2B, 2N]
    # This rank's sample i sits at global row rank*B + i in each view block.
    local = torch.arange(B, device=z1.device) + rank * B               # [B]
    self_idx = torch.cat([local, local + N])                           # where each query meets itself
    pos_idx = torch.cat([local + N, local])                            # its other view
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))       # never contrast with itself
    return F.cross_entropy(logits, pos_idx)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, grad_through_keys: bool = True) -> torch.Tensor:
    """InfoNCE where query q[i]'s positive is key k[i] and every other key, on every rank, is a negative.

    q, k: [N, D] on this rank (L2-normalised here). Keys are gathered from all W ranks into
    [W*N, D]: with gradients when they come from the network being trained (CPC's targets), without
    when they come from a momentum encoder (MoCo v3). Returns the mean loss over the N local queries.
    """
    rank, world = world_info()
    N = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    keys = gather_with_grad(k) if grad_through_keys else gather_no_grad(k)     # [W*N, D]
    logits = q @ keys.t() / temperature                                          # [N, W*N]
    labels = torch.arange(N, device=q.device) + rank * N                         # positives: our own rows
    return F.cross_entropy(logits, labels)


def queue_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's loss: q[i] against its key k[i] (positive) and the K keys of a queue (negatives).

    q, k: [B, D] L2-normalised (k without gradient); queue: [K, D] L2-normalised.
    """
    l_pos = (q * k).sum(1, keepdim=True)                                         # [B, 1]
    l_neg = q @ queue.t()                                                        # [B, K]
    logits = torch.cat([l_pos, l_neg], 1) / temperature                          # [B, 1+K]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
