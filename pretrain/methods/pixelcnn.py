"""Gated PixelCNN (van den Oord et al. 2016): p(x) = prod_i p(x_i | x_<i) over pixels in raster order,
with exact likelihood. Each pixel's channels are modelled given all previous pixels (and independently
of each other), by a 256-way softmax or a mixture of discretized logistics per sub-pixel.
`bits_per_dim` is the exact NLL; `sample` draws pixel by pixel (H x W network evaluations).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.losses.likelihood import logistic_mixture_log_prob, to_levels
from pretrain.methods.generative import GenerativeMethod, multinomial, rand
from pretrain.methods.registry import METHODS
from pretrain.models.generative import GatedPixelCNN
from pretrain.params import choice, integer

OUTPUTS = ("softmax", "logistic_mixture")


@METHODS.register("pixelcnn")
class PixelCNN(GenerativeMethod):
    defaults = {"output": "softmax", "mixtures": 5, "dim": 64, "layers": 8, "kernel": 5}
    checks = {"output": choice(*OUTPUTS), "mixtures": integer(1), "dim": integer(1), "layers": integer(1),
              "kernel": integer(3)}   # and odd: checked below

    @classmethod
    def uses_backbone(cls, kwargs):
        return False   # a pixel-space model: no timm backbone to train or export

    def __init__(self, backbone: Optional[nn.Module], output="softmax", mixtures=5, dim=64, layers=8, kernel=5, image_size=32):
        super().__init__(backbone, image_size)
        if kernel % 2 == 0:
            raise ValueError(f"method.kernel must be odd and >= 3, got {kernel}")
        self.output, self.mixtures = output, mixtures
        self.net = GatedPixelCNN(3, dim, layers, kernel, 256 if output == "softmax" else 3 * mixtures)

    def log_prob(self, x):
        """Exact log p(x) per image, in nats: x [B, 3, H, W] in [-1, 1] -> [B]."""
        out = self.net(x)                                                       # [B, 3, K, H, W]
        if self.output == "softmax":
            lp = -F.cross_entropy(out.float().transpose(1, 2), to_levels(x), reduction="none")   # [B, 3, H, W]
        else:
            lp = logistic_mixture_log_prob(x, out)
        return lp.flatten(1).sum(1)

    def training_step(self, batch, ctx):
        x = batch["views"][0][0]
        nats = -self.log_prob(x).mean() / x[0].numel()                         # nats per dim
        return {"loss": nats, "bits_per_dim": nats.detach() / math.log(2)}

    @torch.no_grad()
    def bits_per_dim(self, images, generator=None):
        return -self.log_prob(images) / (images[0].numel() * torch.log(torch.tensor(2.0)))

    @torch.no_grad()
    def sample(self, n, generator=None, **kwargs):
        S, dev = self.image_size, self._device()
        x = torch.zeros(n, 3, S, S, device=dev)
        for i in range(S):
            for j in range(S):
                out = self.net(x)[:, :, :, i, j].float()                       # [n, 3, K]
                if self.output == "softmax":
                    probs = out.softmax(-1).flatten(0, 1).cpu()
                    k = multinomial(probs, generator).view(n, 3)
                    x[:, :, i, j] = (k.to(dev).float() / 127.5 - 1)
                else:
                    logit_pi, mean, log_scale = out.chunk(3, dim=-1)           # [n, 3, M]
                    u = rand(logit_pi.shape, generator, dev)
                    comp = (logit_pi - torch.log(-torch.log(u.clamp(1e-5, 1 - 1e-5)))).argmax(-1, keepdim=True)
                    m, ls = mean.gather(-1, comp).squeeze(-1), log_scale.gather(-1, comp).squeeze(-1)
                    v = rand(m.shape, generator, dev).clamp(1e-5, 1 - 1e-5)
                    val = m + torch.exp(ls) * (torch.log(v) - torch.log1p(-v))
                    x[:, :, i, j] = ((val.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        return x
