"""Run under torchrun (2 ranks, gloo): NNCLR through the real DDP backend with global BN. Rank r takes samples
[r*B, (r+1)*B) of a fixed global batch per step; rank 0 saves step 1's rank-mean loss and DDP's averaged
gradients (the support set is the fixed seed-0 one then), and, after every step, every rank's support set and
pointer. tests/test_nnclr.py replays the same steps in one process at the whole batch.

argv: OUT_PT
"""
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from nnclr_common import STEPS, global_batch, small  # noqa: E402

from pretrain import comm  # noqa: E402
from pretrain import dist as pdist  # noqa: E402
from pretrain.engine.backends import create_backend  # noqa: E402
from pretrain.models import convert_sync_bn  # noqa: E402

out = sys.argv[1]
pdist.init_distributed(pdist.env_from(), "gloo", timeout_s=300)
rank, world = comm.rank(), comm.world_size()
cfg, method = small()
be = create_backend(convert_sync_bn(method, torch.device("cpu")), cfg, torch.device("cpu"))
result = {"support": []}
for step in range(STEPS):
    views = global_batch(step)                               # [2, W*B, 3, 16, 16]
    B = views.shape[1] // world
    be.set_lr(0.05)
    with be.accumulate(last=True):
        loss = be.forward({"views": [views[:, rank * B:(rank + 1) * B]]})["loss"]
        be.backward(loss)
    if step == 0:
        result["loss"] = comm.all_reduce_mean(loss.detach())
        result["grads"] = {n: p.grad.clone() for n, p in be.module.named_parameters() if p.grad is not None}
    be.step()
    be.module.after_step(be.module.step_context(step + 1, STEPS))
    result["support"].append(comm.all_gather_object((be.module.support.clone(), be.module.support_ptr)))
if rank == 0:
    torch.save(result, out)
pdist.cleanup()
