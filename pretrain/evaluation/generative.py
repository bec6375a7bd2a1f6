"""Offline metrics for generative models, with nothing downloaded:

* bits/dim on held-out shards (exact for PixelCNN, an upper bound for the VAE and DDPM), next to a
  per-pixel independent histogram model fit on the train split (`histogram_bits_per_dim`);
* a Frechet distance between real and generated images in the feature space of a backbone we
  trained (e.g. an exported SimCLR backbone). It is the FID formula, but NOT comparable to
  Inception-FID numbers: other features, other images, other scale.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_signed(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1] on the 8-bit grid (what the generative methods model)."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def histogram_bits_per_dim(train_uint8: torch.Tensor, val_uint8: torch.Tensor, alpha: float = 1.0) -> float:
    """Baseline: every sub-pixel position has its own 256-bin histogram over the train split
    (add-alpha smoothed), positions independent. Returns its NLL on val in bits/dim."""
    N, D = train_uint8.shape[0], train_uint8[0].numel()
    tr, va = train_uint8.reshape(N, D).long(), val_uint8.reshape(val_uint8.shape[0], D).long()
    counts = torch.full((D, 256), alpha, dtype=torch.float64)
    counts.scatter_add_(1, tr.t(), torch.ones_like(tr.t(), dtype=torch.float64))
    logp = (counts / counts.sum(1, keepdim=True)).log()                      # [D, 256]
    nll = -logp.gather(1, va.t()).sum(0)                                     # [M] nats per image
    return float(nll.mean() / (D * math.log(2)))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets [N, D] and [M, D], in float64.

    Tr (S_a S_b)^(1/2) = sum_i sqrt(lambda_i) with lambda the eigenvalues of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2) (similar to S_a S_b): two symmetric eigendecompositions, ~10x faster than scipy's
    sqrtm at D = 2048 and without its complex round-off."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T                                     # S_a^(1/2)
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def save_grid(images: torch.Tensor, path, nrow: int = 0) -> torch.Tensor:
    """[-1, 1] images [N, 3, H, W] -> a PNG grid at `path` (written atomically); returns the uint8 grid [3, H', W']."""
    from PIL import Image
    from torchvision.utils import make_grid

    from pretrain.utils import atomic_path

    grid = make_grid(to_uint8(images.cpu()), nrow=nrow or max(1, int(math.sqrt(len(images)))), padding=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return grid
