"""Run under torchrun (W ranks, gloo). Rank r takes samples [r*B, (r+1)*B) of a fixed global batch,
runs SimCLR (timm ResNet with BatchNorm, converted to global BN) wrapped in DDP, backpropagates,
and rank 0 saves the rank-averaged loss, the (DDP-averaged) parameter gradients and the updated BN
buffers. Also checks nt_xent, info_nce and GlobalBatchNorm alone. The test recomputes all of it in one process.

argv: INPUTS_PT OUT_PT
"""
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pretrain import comm
from pretrain import dist as pdist
from pretrain.losses import info_nce, nt_xent
from pretrain.models import GlobalBatchNorm, convert_sync_bn

from grad_common import build_method

inputs, out = torch.load(sys.argv[1]), sys.argv[2]
env = pdist.env_from()
pdist.init_distributed(env, "gloo", timeout_s=120)
rank, world = dist.get_rank(), dist.get_world_size()
B = inputs["views"].shape[1] // world
sl = slice(rank * B, (rank + 1) * B)
result = {}

# 1. SimCLR + global BN + DDP
method = convert_sync_bn(build_method(), torch.device("cpu"))
assert any(isinstance(m, GlobalBatchNorm) for m in method.modules())
ddp = DistributedDataParallel(method)
loss = ddp({"views": [inputs["views"][:, sl]]})["loss"]
loss.backward()
result["loss"] = comm.all_reduce_mean(loss.detach())
result["grads"] = {n: p.grad.clone() for n, p in method.named_parameters()}
result["buffers"] = {n: b.clone() for n, b in method.named_buffers()}

# 2. nt_xent alone: gradients w.r.t. this rank's projections
z1 = inputs["z1"][sl].clone().requires_grad_(True)
z2 = inputs["z2"][sl].clone().requires_grad_(True)
l = nt_xent(z1, z2, 0.3)
l.backward()
parts = [None] * world
dist.all_gather_object(parts, (l.detach(), z1.grad, z2.grad))
result["nt_xent"] = parts

# 3. GlobalBatchNorm alone: output, input grad and (summed) affine grads
bn = GlobalBatchNorm(4)
with torch.no_grad():
    bn.weight.copy_(inputs["bn_w"]), bn.bias.copy_(inputs["bn_b"])
x = inputs["bn_x"][sl].clone().requires_grad_(True)
y = bn(x)
(y * inputs["bn_c"][sl]).sum().backward()
dw, db = bn.weight.grad.clone(), bn.bias.grad.clone()
dist.all_reduce(dw), dist.all_reduce(db)
parts = [None] * world
dist.all_gather_object(parts, (y.detach(), x.grad))
result["bn"] = {"parts": parts, "dw": dw, "db": db, "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone()}

# 4. info_nce (MoCo v3, CPC): keys gathered with gradients (CPC) and without (MoCo v3)
for with_grad in (True, False):
    q = inputs["z1"][sl].clone().requires_grad_(True)
    k = inputs["z2"][sl].clone().requires_grad_(True)
    l = info_nce(q, k, 0.3, grad_through_keys=with_grad)
    l.backward()
    parts = [None] * world
    dist.all_gather_object(parts, (l.detach(), q.grad, k.grad if with_grad else None))
    result[f"info_nce_{with_grad}"] = parts

if rank == 0:
    torch.save(result, out)
# DDP must die before its process group: a reducer outliving the group aborts the process at exit
# ("terminate called without an active exception") about one run in eight.
del ddp, loss
pdist.cleanup()
