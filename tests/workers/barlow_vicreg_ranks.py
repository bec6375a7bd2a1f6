"""Run under torchrun (W ranks, gloo). Rank r takes rows [r*B, (r+1)*B) of fixed embeddings z1, z2 [W*B, D]
and computes, with gradients w.r.t. its own rows:
  * barlow: Barlow Twins' cross-correlation (GlobalBatchNorm(affine=False) per view, then the summed
    matrix) and loss, as pretrain.methods.barlow_twins does;
  * barlow_official: the official main.py's in-place torch.distributed.all_reduce (no backward);
  * vicreg: VICReg's invariance, variance and covariance terms (gathered with gradients) and loss;
  * vicreg_own_slice: the same with a gather whose backward hands each rank only its own gradient slice
    (no sum over ranks), a common hand-written GatherLayer.
Every rank's values and gradients are gathered; rank 0 saves them. The test recomputes all of it in one
process over the whole batch.

argv: INPUTS_PT OUT_PT
"""
import sys

import torch
import torch.distributed as dist

from pretrain import comm
from pretrain import dist as pdist
from pretrain.methods import barlow_twins as bt
from pretrain.methods import vicreg as vr
from pretrain.models import GlobalBatchNorm

inputs, out = torch.load(sys.argv[1]), sys.argv[2]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=120)
rank, world = comm.rank(), comm.world_size()
B = inputs["z1"].shape[0] // world
sl = slice(rank * B, (rank + 1) * B)
result = {}


def local_embeddings():
    return (inputs["z1"][sl].clone().requires_grad_(True), inputs["z2"][sl].clone().requires_grad_(True))


def everyone(*tensors):
    """Each rank's tensors (detached), in rank order."""
    parts = [None] * world
    dist.all_gather_object(parts, tuple(t.detach() for t in tensors))
    return parts


# 1. Barlow Twins as the method computes it
z1, z2 = local_embeddings()
bn = GlobalBatchNorm(z1.shape[1], affine=False)
c = bt.cross_correlation(bn(z1), bn(z2))
loss = bt.barlow_twins_loss(c, inputs["lambd"])[0]
loss.backward()
result["barlow"] = everyone(loss, c, z1.grad, z2.grad)

# 2. the official main.py: c /= N; torch.distributed.all_reduce(c) -- the forward sums, the backward does not
z1, z2 = local_embeddings()
bn = GlobalBatchNorm(z1.shape[1], affine=False)
c = bn(z1).T @ bn(z2) / (B * world)
dist.all_reduce(c)
loss = bt.barlow_twins_loss(c, inputs["lambd"])[0]
loss.backward()
result["barlow_official"] = everyone(loss, c, z1.grad, z2.grad)

# 3. VICReg as the method computes it
z1, z2 = local_embeddings()
inv, var, cov = vr.vicreg_terms(z1, z2)
loss = 25 * inv + 25 * var + cov
loss.backward()
result["vicreg"] = everyone(loss, inv, var, cov, z1.grad, z2.grad)


# 4. VICReg through a gather whose backward returns this rank's own slice only
class OwnSliceGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(world)[rank]


z1, z2 = local_embeddings()
real = vr.gather_with_grad
vr.gather_with_grad = OwnSliceGather.apply
try:
    inv, var, cov = vr.vicreg_terms(z1, z2)
finally:
    vr.gather_with_grad = real
loss = 25 * inv + 25 * var + cov
loss.backward()
result["vicreg_own_slice"] = everyone(loss, z1.grad, z2.grad)

if rank == 0:
    torch.save(result, out)
pdist.cleanup()
