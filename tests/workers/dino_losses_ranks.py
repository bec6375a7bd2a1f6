"""Run under torchrun (W ranks, gloo). Rank r takes rows [r*B, (r+1)*B) of fixed inputs and computes:
  * center: update_center on its teacher logits [Vt, B, K]; center_no_reduce: the same with the all-reduce
    replaced by the identity (each rank's own mean);
  * sinkhorn / sinkhorn_large: sinkhorn_teacher at temp 0.04 on the logits and on 40x the logits;
    sinkhorn_large_local_max: the latter with the per-prototype MAX all-reduce replaced by the identity;
  * koleo: x_r = z_r @ lin (lin shared), loss_r = koleo_loss(x_r), x_r's gradient and lin's gradient;
    koleo_local: global_batch=False; koleo_no_grad_sum: a gather whose backward hands each rank only the
    gradient of its own loss (no sum over ranks), a common hand-written GatherLayer.
Every rank's values are gathered; rank 0 saves them. tests/test_dino_losses.py compares with one process.

argv: INPUTS_PT OUT_PT
"""
import sys

import torch
import torch.distributed as dist

from pretrain import comm
from pretrain import dist as pdist
from pretrain.losses import dino

inputs, out = torch.load(sys.argv[1]), sys.argv[2]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=120)
rank, world = comm.rank(), comm.world_size()
B = inputs["z"].shape[0] // world
sl = slice(rank * B, (rank + 1) * B)
teacher = inputs["teacher"][:, sl]                                       # [Vt, B, K]
result = {}


def everyone(x):
    return comm.all_gather_object(x)


def patched(name, fn, call):
    """call() with pretrain.losses.dino.<name> replaced by fn."""
    old = getattr(dino, name)
    setattr(dino, name, fn)
    try:
        return call()
    finally:
        setattr(dino, name, old)


result["center"] = everyone(dino.update_center(inputs["center"], teacher, 0.9))
result["center_no_reduce"] = everyone(patched("all_reduce_sum_with_grad", lambda x: x,
                                              lambda: dino.update_center(inputs["center"], teacher, 0.9)))
result["sinkhorn"] = everyone(dino.sinkhorn_teacher(teacher, 0.04, 3))
result["sinkhorn_large"] = everyone(dino.sinkhorn_teacher(teacher * 40, 0.04, 3))
result["sinkhorn_large_local_max"] = everyone(patched("_all_reduce_max", lambda x: x,
                                                      lambda: dino.sinkhorn_teacher(teacher * 40, 0.04, 3)))


class _OwnSliceGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(world)[rank]


def koleo(**kw):
    lin = inputs["lin"].clone().requires_grad_(True)
    x = inputs["z"][sl] @ lin
    x.retain_grad()
    loss = dino.koleo_loss(x, **kw)
    loss.backward()
    return everyone({"loss": loss.detach(), "x_grad": x.grad, "lin_grad": lin.grad})


result["koleo"] = koleo()
result["koleo_local"] = koleo(global_batch=False)
result["koleo_no_grad_sum"] = patched("gather_with_grad", _OwnSliceGather.apply, koleo)

if rank == 0:
    torch.save(result, out)
pdist.cleanup()
