"""Run under torchrun (W ranks, gloo). For each method named in argv, rank r takes samples
[r*B, (r+1)*B) of every view of a fixed global batch, runs one forward and backward through the real
training backend (DDP, DeepSpeed ZeRO-2 fp32, or FSDP2 fp32) exactly as the trainer builds it (global BN when the
method asks for it), and rank 0 saves the rank-mean loss and every parameter's rank-averaged gradient
(under ZeRO-2 gathered from its partitions before any optimizer step). The test recomputes both in
one process over the whole batch. Also, as a check that the comparison has teeth: the loss the same
ranks get with per-rank BatchNorm statistics (what plain BN under DDP computes).

argv: BACKEND (ddp|zero2|fsdp) INPUTS_PT OUT_PT METHOD [METHOD ...]
"""
import copy
import sys

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from rank_common import build, rank_slice  # noqa: E402

from pretrain import comm  # noqa: E402
from pretrain import dist as pdist  # noqa: E402
from pretrain.engine.backends import create_backend  # noqa: E402
from pretrain.models import convert_sync_bn  # noqa: E402

backend_name, inputs, out, names = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3], sys.argv[4:]
env = pdist.env_from()
pdist.init_distributed(env, "gloo", timeout_s=300)
rank, world = comm.rank(), comm.world_size()
result = {}
for name in names:
    B = inputs[name]["views"][0].shape[1] // world                  # views per size: [V_g, W*B, 3, S, S]
    local = rank_slice(inputs[name], rank, B)
    cfg, method = build(name, backend={"zero2": "deepspeed"}.get(backend_name, backend_name), global_batch=world * B)
    with torch.no_grad():   # per-rank BN statistics: the loss a run without global BN would see
        plain = comm.all_reduce_mean(copy.deepcopy(method)(local)["loss"].detach())
    if getattr(method, "sync_bn", False):
        method = convert_sync_bn(method, torch.device("cpu"))
    be = create_backend(method, cfg, torch.device("cpu"))
    be.module.before_step(be.module.step_context(10, 20, 5))   # past any warm-up freeze (SwAV: 1 epoch)
    loss = be.forward(local)["loss"]
    if backend_name == "zero2":
        from deepspeed.utils import safe_get_full_grad

        be.model.backward(loss)   # reduces (averages) the gradients into ZeRO-2's partitions; no step
        grads = {n: safe_get_full_grad(p) for n, p in be.module.named_parameters() if p.requires_grad}
    else:
        loss.backward()           # DDP averages the gradients over ranks; FSDP2 reduce-scatters their mean
        grads = {n: p.grad for n, p in be.module.named_parameters() if p.requires_grad}
        grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
    extra = be.module.extra_state()   # state the step changed (DINO's centre): equal to one process's too
    result[name] = {"loss": comm.all_reduce_mean(loss.detach()), "plain_loss": plain,
                    "grads": {n: (g.clone() if g is not None else None) for n, g in grads.items()},
                    "extra": {k: v for k, v in extra.items() if torch.is_tensor(v)}}
    del be, loss
if rank == 0:
    torch.save(result, out)
pdist.cleanup()
