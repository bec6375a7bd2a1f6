"""Run under torchrun (2 ranks, gloo): every rank iterates one training epoch with a collective per
batch, as a training loop does, then reads its share of the eval split. Rank 0 writes a JSON report.

argv: TRAIN_SPEC EVAL_SPEC OUT_JSON BATCHES_PER_EPOCH NUM_WORKERS
"""
import json
import sys

import torch
import torch.distributed as dist

from pretrain import dist as pdist
from pretrain.data import ResampledBatches, SimCLRAugment, TrainLoader, eval_loader, expand_sources

train_spec, eval_spec, out, n_batches, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
env = pdist.env_from()
pdist.init_distributed(env, "gloo", timeout_s=120)
rank, world = dist.get_rank(), dist.get_world_size()

aug = SimCLRAugment(16, [0.5] * 3, [0.25] * 3)
ds = ResampledBatches(expand_sources(train_spec), batch_size=8, batches_per_epoch=n_batches, augment=aug, num_views=2,
                      photometric_in_worker=True, seed=0, rank=rank, shuffle_buffer=16)
loader = TrainLoader(ds, workers, torch.device("cpu"))
count, indices = 0, []
for batch in loader.batches(0):
    if batch["epoch"] != 0:
        break
    x = batch["views"][0].mean().reshape(1)
    dist.all_reduce(x)            # a rank that runs dry first would leave the other one hanging here
    count += 1
    indices.append(int(batch["index"]))
dist.barrier()
counts = [None] * world
dist.all_gather_object(counts, {"count": count, "indices": indices})

# eval: each sample exactly once over ranks x workers
seen = []
for b in eval_loader(eval_spec, batch_size=7, image_size=16, num_workers=workers, rank=rank, world=world):
    for img, y in zip(b["image"], b["label"]):
        seen.append([int(y), int(img.long().sum()), int((img.long() * torch.arange(16)).sum())])
everyone = [None] * world
dist.all_gather_object(everyone, seen)
if rank == 0:
    with open(out, "w") as f:
        json.dump({"train": counts, "eval": everyone}, f)
pdist.cleanup()
