"""DINO / iBOT / DINOv2 losses: teacher centering (EMA centre or Sinkhorn-Knopp), the multi-view
cross-entropy, iBOT's masked-patch loss and DINOv2's KoLeo regulariser.

Every softmax, log-softmax, centre and distance is computed in float32 whatever the input dtype: in
fp16 a logit divided by a temperature of 0.04 overflows from |logit| > 2620 on (a head without
norm_last_layer reaches that), and softmax then gives NaN (facebookresearch/dino issue #58).
Views are stacked on dim 0: logits [V, B, K] (V views of the same B images, K prototypes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.comm import world_info
from pretrain.losses.distributed import all_reduce_sum_with_grad, gather_with_grad
from pretrain.losses.sinkhorn import sinkhorn


@torch.no_grad()
def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((t - center) / temp) over the last dim, float32; t [..., K] (e.g. [Vt, B, K], patches
    [V, B, N, K]), center broadcastable ([1, K], [1, 1, K])."""
    return F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def sinkhorn_teacher(teacher_logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets [Vt, B, K] (float32, each row sums to 1) for teacher_logits
    [Vt, B, K]: the Vt*B samples of every rank equipartitioned over the K prototypes.

    `sinkhorn` computes exp((scores - 1) / eps), which is finite only for scores near or below 1. A
    per-prototype constant cancels exactly in its first row normalisation, so each prototype's logits are
    shifted to a maximum of 1 over all ranks: any logits work (in float64, as long as no sample lies
    more than ~700 * temp below every prototype's maximum)."""
    Vt, B, K = teacher_logits.shape
    t = teacher_logits.reshape(Vt * B, K).double()                          # [N, K]
    top = _all_reduce_max(t.max(dim=0, keepdim=True).values)                # [1, K]: per prototype, all ranks
    return sinkhorn(t - top + 1, temp, iterations).view(Vt, B, K)


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Scalar: mean over the pairs (teacher view it, student view iv != it) of
    mean_b -sum_k p_t[it, b, k] * log_softmax(s[iv, b] / student_temp)[k].

    student_logits [Vs, B, K] (any dtype; computed in float32), teacher_probs [Vt, B, K] (no grad). The
    teacher views are the first Vt student views (the global crops), so Vt*Vs - Vt pairs (DINO's
    total_loss / n_loss_terms; DINOv2 pairs each global crop with the other through a swap: the same pairs)."""
    Vs, B, K = student_logits.shape
    Vt = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (B, K) or not 1 <= Vt <= Vs or Vs < 2:
        raise ValueError(f"dino_loss: teacher {tuple(teacher_probs.shape)} vs student {tuple(student_logits.shape)}: "
                         f"need [Vt, B, K] and [Vs, B, K] with Vt <= Vs and at least one pair of different views")
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)            # [Vs, B, K]
    ce = -torch.einsum("tbk,sbk->ts", teacher_probs.float().detach(), lsm) / B    # [Vt, Vs]: mean_b of the CE
    keep = ~torch.eye(Vt, Vs, dtype=torch.bool, device=ce.device)                 # skip same-view pairs
    return ce[keep].mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """The new centre (a new float32 tensor shaped like center; `center` is not modified):
    momentum * center + (1 - momentum) * mean of teacher_logits [..., K] over all its leading dims and all
    ranks (all-reduced sum / (count * world); every rank must pass the same count). [Vt, B, K] with
    center [1, K] for DINO; patches [V, B, N, K] with center [1, 1, K] for iBOT (its mean over patches
    then images)."""
    world = world_info()[1]
    K = teacher_logits.shape[-1]
    flat = teacher_logits.reshape(-1, K).float()                                  # [n, K]
    batch = all_reduce_sum_with_grad(flat.sum(dim=0)) / (flat.shape[0] * world)  # [K]
    return center.float() * momentum + batch.view(center.shape) * (1 - momentum)


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
                    student_temp: float) -> torch.Tensor:
    """iBOT's masked-patch loss (main_ibot.py iBOTLoss): for each view v and image b, the mean over its
    masked patches of -sum_k p_t[v, b, n, k] log_softmax(s[v, b, n] / student_temp)[k] (the sum divided by
    max(#masked, 1), so an image without masked patches adds 0 but still counts), then the mean over images
    and views. Student view v against teacher view v only.

    student_patch_logits [V, B, N, K], teacher_patch_probs [V, B, N, K], masks [V, B, N] bool. Only the masked
    patches' log-softmax is computed."""
    V, B, N, K = student_patch_logits.shape
    if teacher_patch_probs.shape != student_patch_logits.shape or masks.shape != (V, B, N):
        raise ValueError(f"ibot_patch_loss: student {tuple(student_patch_logits.shape)}, teacher "
                         f"{tuple(teacher_patch_probs.shape)}, masks {tuple(masks.shape)}: need [V, B, N, K] twice and [V, B, N]")
    masks = masks.bool()
    lsm = F.log_softmax(student_patch_logits[masks].float() / student_temp, dim=-1)   # [M, K]
    ce = -(teacher_patch_probs[masks].float().detach() * lsm).sum(-1)               # [M]
    weight = (1 / masks.sum(-1, keepdim=True).clamp(min=1)).expand(V, B, N)[masks]  # [M]: 1 / #masked of its image
    return (ce * weight).sum() / (V * B)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, global_batch: bool = True) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: -mean_i log(||x_i - x_nn(i)|| + eps) over this rank's rows i of the
    L2-normalised x [B, D] (float32), nn(i) the nearest other row by dot product.

    global_batch: neighbours are searched among the normalised rows of all ranks (gathered with gradient),
    each rank's loss averaging its own rows; with DDP's mean over ranks this is exactly the loss of the
    one-process global batch, gradients included. False: each rank's own rows only (DINOv2's code). The
    distance is DINOv2's nn.PairwiseDistance(eps=eps): ||x_i - x_nn + eps||, finite gradient for duplicates."""
    x = F.normalize(x.float(), dim=-1, eps=eps)                                   # [B, D]
    rank = world_info()[0] if global_batch else 0
    pool = gather_with_grad(x) if global_batch else x                             # [W*B, D], this rank's at rank*B
    if pool.shape[0] < 2:
        raise ValueError("koleo_loss needs at least 2 samples to find nearest neighbours")
    with torch.no_grad():
        dots = x @ pool.t()                                                       # [B, W*B]
        rows = torch.arange(x.shape[0], device=x.device)
        dots[rows, rows + rank * x.shape[0]] = float("-inf")                      # not oneself
        nn_idx = dots.argmax(dim=1)                                               # [B]
    return -torch.log(F.pairwise_distance(x, pool[nn_idx], eps=eps) + eps).mean()
