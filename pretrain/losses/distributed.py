"""Differentiable collectives used inside losses and norms.

They are plain `torch.distributed` calls wrapped in autograd functions, so they work with gloo on
CPU and NCCL on GPU, and are no-ops in a single process.

Gradient convention: each rank r computes its own loss L_r and DDP/DeepSpeed average the parameter
gradients over ranks, i.e. optimise (1/W) * sum_r L_r. For y = f(x_0, ..., x_{W-1}) shared by all
ranks, dL/dx_s = sum_r dL_r/dy[...]: the backward of a gather or an all-reduce is an all-reduce
SUM of the incoming gradients (then the rank's own slice for a gather).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.comm import world_info


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = world_info()
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.world, 0)[ctx.rank]


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each of W ranks -> [W*B, ...] in rank order, on every rank; gradients flow back.

    All ranks must pass the same B (the engine guarantees equal per-rank batches).
    """
    if world_info()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks, on every rank, with the matching backward."""
    if world_info()[1] == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] per rank -> [W*B, ...], no autograd (for queues, monitors)."""
    if world_info()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_info()[1])]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor):
    """Shuffle-BN, step 1 (MoCo): gather [B, ...] from all W ranks, permute the W*B samples at
    random (rank 0 draws the permutation), and give each rank B of them. Returns (x_shuffled [B, ...],
    perm [W*B]); hand `perm` to `unshuffle_across_ranks` to put the outputs back. One process: a
    local permutation."""
    rank, world = world_info()
    x_all = gather_no_grad(x)                                            # [W*B, ...]
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        dist.broadcast(perm, 0)                                          # the same permutation everywhere
    return x_all[perm.view(world, -1)[rank]], perm


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN, step 2: y [B, ...] computed from this rank's shuffled samples -> the outputs of
    this rank's own original samples, in their original order."""
    rank, world = world_info()
    y_all = gather_no_grad(y)                                            # row j belongs to sample perm[j]
    out = torch.empty_like(y_all)
    out[perm] = y_all
    return out.view(world, -1, *y.shape[1:])[rank]
