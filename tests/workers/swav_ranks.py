"""Run under torchrun (2 ranks, gloo): SwAV's distributed Sinkhorn, its per-rank queue through
extra_state, and the prototype freeze under the real backends' steps (DDP, DeepSpeed ZeRO-2).
Rank 0 saves what every rank saw; tests/test_swav.py checks it.

argv: OUT_PT
"""
import sys

import torch
import torch.distributed as dist

from pretrain import dist as pdist
from pretrain.config import load_config
from pretrain.engine.backends import DDPBackend, DeepSpeedBackend
from pretrain.methods import create_method
from pretrain.methods.swav import sinkhorn

out = sys.argv[1]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=300)
rank, world = dist.get_rank(), dist.get_world_size()
result = {}


def gather(obj):
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


# 1. Sinkhorn on each rank's own scores: cosines of random unit vectors, 6 samples x 5 prototypes per rank
g = torch.Generator().manual_seed(10 + rank)
z = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
c = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
scores = z @ c.t()
result["sinkhorn"] = gather({"scores": scores, "codes": sinkhorn(scores, 0.05, 3)})


def small(*extra):
    cfg = load_config(None, ["data.train=unused", "model.name=resnet10t", "data.image_size=16", "method.name=swav",
                             "method.num_local_crops=2", "method.local_crop_size=8", "method.num_prototypes=12",
                             "method.proj_hidden_dim=32", "method.proj_dim=16", *extra])
    torch.manual_seed(0)   # identical initial weights on every rank
    return cfg, create_method(cfg)


def batch(step, B=4):
    g = torch.Generator().manual_seed(100 * step + rank)   # different samples per rank
    return {"views": [torch.randn(2, B, 3, 16, 16, generator=g), torch.randn(2, B, 3, 8, 8, generator=g)]}


# 2. the queue (per rank, different on each) through extra_state: every rank's part saved, each restores its own
_, m = small("method.queue_length=24", "method.epoch_queue_starts=0")   # 24 = 3 global batches of 8: 12 per rank
with torch.no_grad():
    for step in range(2):
        m.before_step(m.step_context(step, 10, 5))
        m(batch(step))
state = m.extra_state()
_, fresh = small("method.queue_length=24", "method.epoch_queue_starts=0")
fresh.load_extra_state(state)
result["queue"] = gather({"queue": m.queue.clone(), "state_queue": state["queue"], "restored": fresh.queue.clone(),
                          "filled": fresh.queue_filled})


# 3. the freeze under each backend's real step: steps_per_epoch 2, so steps 0 and 1 frozen, step 2 not
def freeze_run(backend_cls, *extra):
    cfg, m = small("optim.name=adamw", "optim.weight_decay=0.05", "train.global_batch_size=8", *extra)
    be = backend_cls(m, cfg, torch.device("cpu"))
    seen = [(m.prototypes.weight.detach().clone(), m.projector[0].weight.detach().clone())]
    for step in range(3):
        be.set_lr(1e-2)
        m.before_step(m.step_context(step, 3, 2))
        with be.accumulate(last=True):
            be.backward(be.forward(batch(step))["loss"])
        be.step()
        seen.append((m.prototypes.weight.detach().clone(), m.projector[0].weight.detach().clone()))
    return seen


result["freeze_ddp"] = freeze_run(DDPBackend)
result["freeze_zero2"] = freeze_run(DeepSpeedBackend, "train.backend=deepspeed", "deepspeed.zero_stage=2")

if rank == 0:
    torch.save(result, out)
pdist.cleanup()
