"""Run under torchrun (2 ranks, gloo): GlobalBatchNorm on inputs with a large mean offset, rank r taking
rows [sizes[:r].sum(), sizes[:r+1].sum()) of a fixed global batch (unequal per-rank batches). Rank 0
saves every rank's output and input gradient of sum(y * c), the all-reduced affine gradients and the
running statistics; tests/test_numerics.py compares them with a float64 BatchNorm over the whole batch.

argv: INPUTS_PT OUT_PT
"""
import sys

import torch
import torch.distributed as dist

from pretrain import dist as pdist
from pretrain.models import GlobalBatchNorm

inputs, out = torch.load(sys.argv[1]), sys.argv[2]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=120)
rank, world = dist.get_rank(), dist.get_world_size()
edges = [0] + torch.tensor(inputs["sizes"]).cumsum(0).tolist()
sl = slice(edges[rank], edges[rank + 1])

bn = GlobalBatchNorm(inputs["w"].numel())
with torch.no_grad():
    bn.weight.copy_(inputs["w"]), bn.bias.copy_(inputs["b"])
x = inputs["x"][sl].clone().requires_grad_(True)
y = bn(x)
(y * inputs["c"][sl]).sum().backward()
dw, db = bn.weight.grad.clone(), bn.bias.grad.clone()
dist.all_reduce(dw), dist.all_reduce(db)
parts = [None] * world
dist.all_gather_object(parts, (y.detach(), x.grad))
if rank == 0:
    torch.save({"y": torch.cat([p[0] for p in parts]), "dx": torch.cat([p[1] for p in parts]), "dw": dw, "db": db,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, out)
pdist.cleanup()
