"""NT-Xent / InfoNCE (SimCLR) in cross-entropy form, with negatives from all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.distributed import gather_with_grad, world_info


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
