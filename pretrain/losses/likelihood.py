"""Exact discrete likelihoods of 8-bit images, for bits/dim.

Images are in [-1, 1] on the 8-bit grid (x = 2k/255 - 1, k = 0..255: data.mean = data.std = 0.5).
Each sub-pixel's bin is [x - 1/255, x + 1/255], with the edge bins open to -inf / +inf, so the
probabilities of the 256 values sum to one and -log p is an exact code length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("logistic", "gaussian")


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> integer levels 0..255 (long)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).long()


def _log_cdf_pair(z_hi, z_lo, kind: str):
    """log CDF(z_hi), log(1 - CDF(z_lo)), log(CDF(z_hi) - CDF(z_lo)) for a standard logistic or normal."""
    if kind == "logistic":
        log_cdf_hi = F.logsigmoid(z_hi)
        log_sf_lo = F.logsigmoid(-z_lo)
        # log(sigmoid(a) - sigmoid(b)) = log(sigmoid(a)) + log(1 - exp(b - a)) + log(sigmoid(-b)) ... stable form:
        log_mid = torch.log(torch.clamp(torch.sigmoid(z_hi) - torch.sigmoid(z_lo), min=1e-12))
    elif kind == "gaussian":
        normal = torch.distributions.Normal(0.0, 1.0)
        log_cdf_hi = torch.special.log_ndtr(z_hi)
        log_sf_lo = torch.special.log_ndtr(-z_lo)
        log_mid = torch.log(torch.clamp(normal.cdf(z_hi) - normal.cdf(z_lo), min=1e-12))
    else:
        raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {kind!r}")
    return log_cdf_hi, log_sf_lo, log_mid


def discretized_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """log P(x) per sub-pixel under a discretized logistic or Gaussian with this mean and log scale.
    x, mean, log_scale: same shape, x in [-1, 1] on the 8-bit grid. Returns that shape."""
    x, mean, log_scale = x.float(), mean.float(), log_scale.float().clamp(min=-7.0)
    inv = torch.exp(-log_scale)
    z_hi, z_lo = (x - mean + 1 / 255) * inv, (x - mean - 1 / 255) * inv
    log_cdf_hi, log_sf_lo, log_mid = _log_cdf_pair(z_hi, z_lo, kind)
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, log_mid))


def logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """log P(x) per sub-pixel under a mixture of K discretized logistics.
    x: [B, C, H, W]; params: [B, C, 3K, H, W] = (mixture logits, means, log scales). Returns [B, C, H, W]."""
    logit_pi, mean, log_scale = params.float().chunk(3, dim=2)                       # each [B, C, K, H, W]
    lp = discretized_log_prob(x.unsqueeze(2).expand_as(mean), mean, log_scale, "logistic")
    return torch.logsumexp(F.log_softmax(logit_pi, dim=2) + lp, dim=2)


def bits_per_dim(nll_nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats per image -> bits per sub-pixel."""
    return nll_nats / (dims * math.log(2))
