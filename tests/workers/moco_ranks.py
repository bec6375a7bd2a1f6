"""Run under torchrun (2 ranks, gloo): shuffle-BN's shuffle/unshuffle, and MoCo v2's queue and key
encoder after a few DDP steps. Rank 0 saves what every rank saw; tests/test_moco_cpc.py checks it.

argv: OUT_PT
"""
import sys

import torch
from pretrain.schedules import Schedule
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pretrain import dist as pdist
from pretrain.losses import shuffle_across_ranks, unshuffle_across_ranks
from pretrain.methods.moco_v2 import MoCoV2
from pretrain.models import create_backbone

out = sys.argv[1]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=120)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(100 + rank)   # ranks draw different random numbers, as in training
B, K, STEPS = 6, 20, 4          # global batch 12 per step; K=20 is not a multiple of it
result = {}

# 1. shuffle / unshuffle: sample ids as the "images", an arbitrary per-sample function as the "encoder"
ids = (torch.arange(B) + rank * B).float()[:, None]                    # [B, 1]: this rank's samples
xs, perm = shuffle_across_ranks(ids)
back = unshuffle_across_ranks(xs * 10 + 1, perm)
parts = [None] * world
dist.all_gather_object(parts, {"ids": ids, "shuffled": xs, "unshuffled": back, "perm": perm})
result["shuffle"] = parts

# 2. MoCo v2 under DDP: a few SGD steps on different data per rank
torch.manual_seed(0)            # identical initial weights everywhere
method = MoCoV2(create_backbone("resnet10t"), proj_hidden_dim=32, proj_dim=16, queue_size=K)
method.schedules["momentum"] = Schedule(0.9)
ddp = DistributedDataParallel(method)
opt = torch.optim.SGD([p for g in method.param_groups(0.0) for p in g["params"]], lr=0.1)
g = torch.Generator().manual_seed(rank)
keys = []
for step in range(STEPS):
    views = torch.randn(2, B, 3, 16, 16, generator=g)
    loss = ddp({"views": [views]})["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad()
    method.after_step(method.step_context(step + 1, STEPS))
parts = [None] * world
dist.all_gather_object(parts, {"queue": method.queue.clone(), "ptr": method.queue_ptr,
                               "key_backbone": {k: v.clone() for k, v in method.key_backbone.state_dict().items()}})
result["moco"] = parts

# 3. keys() with shuffle-BN, in eval mode (BN then per sample): the same as the key encoder on the
#    rank's own samples, in the same order
method.eval()
for b in method.buffers():   # what DDP's next forward would do: every rank on rank 0's BN statistics
    dist.broadcast(b, 0)
x = torch.randn(B, 3, 16, 16, generator=g)
result_keys = (method.keys(x), method._key(x))
parts = [None] * world
dist.all_gather_object(parts, result_keys)
result["keys"] = parts

if rank == 0:
    torch.save(result, out)
del ddp   # before the process group goes (see simclr_grads.py)
pdist.cleanup()
