"""VAE (Kingma & Welling 2014): timm encoder -> (mu, log var), DCGAN-style decoder -> a discretized
logistic or Gaussian per sub-pixel. Loss: the negative ELBO per dimension, with an optional beta:

    loss = (-log p(x | z) + beta * KL(q(z | x) || N(0, I))) / D        z = mu + sigma * eps
    bpd  = (-log p(x | z) + KL) / (D ln 2)      (beta = 1: an upper bound on -log2 p(x) per dim)
"""
from __future__ import annotations

import json
import math
from typing import Optional

import torch
import torch.nn as nn

from pretrain.losses.likelihood import LIKELIHOODS, discretized_log_prob
from pretrain.methods.generative import GenerativeMethod, randn
from pretrain.methods.registry import METHODS
from pretrain.models.generative import ConvDecoder
from pretrain.params import choice, integer, non_negative


@METHODS.register("vae")
class VAE(GenerativeMethod):
    defaults = {"latent_dim": 64, "likelihood": "logistic", "beta": 1.0, "decoder_width": 64}
    checks = {"latent_dim": integer(1), "likelihood": choice(*LIKELIHOODS), "beta": non_negative(),
              "decoder_width": integer(1)}

    def __init__(self, backbone: nn.Module, latent_dim=64, likelihood="logistic", beta=1.0, decoder_width=64,
                 image_size=32):
        super().__init__(backbone, image_size)
        self.latent_dim, self.likelihood, self.beta = latent_dim, likelihood, beta
        self.to_latent = nn.Linear(backbone.num_features, 2 * latent_dim)
        # per sub-pixel: mean and log scale
        self.decoder = ConvDecoder(latent_dim, image_size, out_channels=6, width=decoder_width)

    def posterior(self, x):
        """q(z | x) of images x [B, 3, S, S]: (mean, log variance), [B, L] each, fp32."""
        mu, logvar = self.to_latent(self.backbone(x)).float().chunk(2, dim=1)
        return mu, logvar

    def _terms(self, x, eps):
        mu, logvar = self.posterior(x)                                                  # [B, L] each
        z = mu + torch.exp(0.5 * logvar) * eps
        mean, log_scale = self.decoder(z.to(x.dtype)).float().chunk(2, dim=1)          # [B, 3, S, S] each
        nll = -discretized_log_prob(x, torch.tanh(mean), log_scale, self.likelihood).flatten(1).sum(1)   # [B] nats
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)                       # [B] nats
        return nll, kl

    def training_step(self, batch, ctx):
        x = batch["views"][0][0]                                                        # [B, 3, S, S] in [-1, 1]
        D = x[0].numel()
        nll, kl = self._terms(x, torch.randn(x.shape[0], self.latent_dim, device=x.device))
        return {"loss": (nll + self.beta * kl).mean() / D, "recon_nats_per_dim": nll.mean().detach() / D,
                "kl_nats_per_dim": kl.mean().detach() / D,
                "neg_elbo_bits_per_dim": (nll + kl).mean().detach() / (D * math.log(2))}

    @torch.no_grad()
    def bits_per_dim(self, images, generator=None):
        nll, kl = self._terms(images, randn((images.shape[0], self.latent_dim), generator, images.device))
        return (nll + kl) / (images[0].numel() * torch.log(torch.tensor(2.0)))

    @torch.no_grad()
    def sample(self, n, generator=None, **kwargs):
        return self.decode(randn((n, self.latent_dim), generator, self._device()))

    # ---- as the frozen autoencoder of latent diffusion (pretrain/methods/denoising.py) ----------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> a posterior sample z = mu + sigma * eps [B, latent_dim]."""
        mu, logvar = self.posterior(x)
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent_dim] -> images [B, 3, S, S]: the likelihood's mean (its mode), as VAE grids show."""
        mean, _ = self.decoder(z.to(self.to_latent.weight.dtype)).float().chunk(2, dim=1)
        return torch.tanh(mean)


def load_autoencoder(path, image_size: Optional[int] = None) -> VAE:
    """The VAE in `path`, a file written by `pretrain export VAE_RUN --which autoencoder` (safetensors: every
    weight of the VAE, and its run config in the metadata; nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from pretrain.config import from_dict
    from pretrain.methods import create_method

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pretrain", "{}"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"method.autoencoder={path} is not a readable safetensors file ({e}); write one with "
                         f"`pretrain export VAE_RUN --which autoencoder --out FILE`") from None
    if meta.get("which") != "autoencoder" or meta.get("method") != "vae":
        raise ValueError(f"method.autoencoder={path} is not a VAE autoencoder export; write one with "
                         f"`pretrain export VAE_RUN --which autoencoder --out FILE`")
    cfg = from_dict(meta["config"])
    if image_size is not None and cfg.data.image_size != image_size:
        raise ValueError(f"the autoencoder {path} was trained at {cfg.data.image_size} px; set data.image_size="
                         f"{cfg.data.image_size}")
    vae = create_method(cfg, warm_start=False)
    vae.load_state_dict(load_file(str(path)))
    return vae
