"""`pretrain latents`: encode image shards once with a frozen VAE (a `pretrain export VAE_RUN --which autoencoder`
file) into latent shards: per sample the posterior's mean and log variance, float32 [2, L], as `KEY.npy` (numpy's
format, read back without pickle) beside its `.cls`. `ddpm` / `flow` with that `method.autoencoder` train on them
without running the encoder every step; pointing data.train at image shards instead encodes on the fly.
Precomputed latents are of the centre-cropped images: no augmentation (DDPM's flips) at training time.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from pretrain.data import eval_loader
from pretrain.data.shards import ShardWriter
from pretrain.evaluation.generative import to_signed


@torch.no_grad()
def write_latents(autoencoder, spec: str, out_dir, batch_size: int = 256, shard_size: int = 1000,
                  workers: int = 0) -> dict:
    """Encode every image of `spec` (centre-cropped to the autoencoder's size) -> shards in `out_dir` + index.json
    (with the source split's class names when its index.json has them). Returns the index."""
    from pretrain.methods.vae import load_autoencoder

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    vae = load_autoencoder(autoencoder).eval()
    src_index = Path(spec) / "index.json"
    classes = json.loads(src_index.read_text()).get("classes", []) if src_index.is_file() else []
    writer, i = ShardWriter(Path(out_dir), shard_size), 0
    try:
        for batch in eval_loader(spec, batch_size, vae.image_size, workers, key="--data"):
            mu, logvar = vae.posterior(to_signed(batch["image"]))                          # [b, L] each
            for m, lv, y in zip(mu, logvar, batch["label"].tolist()):
                buf = io.BytesIO()
                np.save(buf, torch.stack([m, lv]).numpy().astype(np.float32), allow_pickle=False)
                writer.write(f"{i:08d}", buf.getvalue(), "npy", int(y), {"latent_dim": int(m.numel())})
                i += 1
    except BaseException:
        writer.abort()
        raise
    if not i:
        writer.abort()
        raise ValueError(f"--data {spec} has no images to encode")
    return writer.finish(classes)
