"""GAN with alternating D and G steps, each with its own optimizer (two engine phases), an optional
R1 penalty, and an EMA of the generator for sampling.

    phase "d":  loss_D = l_real(D(x)) + l_fake(D(G(z)))  [+ r1/2 * |grad_x D(x)|^2]     G frozen
    phase "g":  loss_G = l_gen(D(G(z)))                                                  D frozen
hinge:          l_real = relu(1 - s), l_fake = relu(1 + s), l_gen = -s
non_saturating: l_real = softplus(-s), l_fake = softplus(s), l_gen = softplus(-s)

The discriminator's trunk is the timm backbone (`discriminator: timm`) or a DCGAN conv net
(`discriminator: dcgan`); either way it is `self.backbone`, whose features the kNN monitor reads. Only
the timm trunk can be exported (`pretrain export` writes timm models).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.methods.generative import GenerativeMethod, randn
from pretrain.methods.registry import METHODS
from pretrain.models.ema import EMA, momentum_copy
from pretrain.models.generative import ConvDecoder, DCGANDiscriminatorTrunk
from pretrain.params import choice, fraction, integer, non_negative

LOSSES = ("hinge", "non_saturating")


@METHODS.register("gan")
class GAN(GenerativeMethod):
    phases = ("d", "g")
    defaults = {"latent_dim": 128, "loss": "hinge", "r1": 0.0, "discriminator": "dcgan", "width": 64,
                "ema_decay": 0.999}
    checks = {"latent_dim": integer(1), "loss": choice(*LOSSES), "r1": non_negative(), "discriminator": choice("timm", "dcgan"),
              "width": integer(1), "ema_decay": fraction()}

    @classmethod
    def uses_backbone(cls, kwargs):
        return kwargs["discriminator"] == "timm"   # the DCGAN discriminator builds its own trunk

    def __init__(self, backbone: Optional[nn.Module], latent_dim=128, loss="hinge", r1=0.0, discriminator="dcgan", width=64,
                 ema_decay=0.999, image_size=32):
        super().__init__(backbone, image_size)
        self.latent_dim, self.loss, self.r1, self.ema_decay = latent_dim, loss, r1, ema_decay
        self.timm_backbone = discriminator == "timm"   # a DCGAN trunk is no timm model: `pretrain export` refuses it
        if discriminator == "dcgan":
            self.backbone = DCGANDiscriminatorTrunk(image_size, width)
        self.d_head = nn.Linear(self.backbone.num_features, 1)
        self.generator = nn.Sequential(ConvDecoder(latent_dim, image_size, 3, width), nn.Tanh())
        self.generator_ema = momentum_copy(self.generator)
        self.ema = EMA(self.generator_ema, self.generator, copy_buffers=True)
        # the D phase's parameters, as one module (not registered: the state dict keeps its own names)
        self.__dict__["_d_net"] = nn.ModuleList([self.backbone, self.d_head])

    def phase_module(self, phase):
        return {"d": self._d_net, "g": self.generator}[phase]

    def discriminate(self, x):
        return self.d_head(self.backbone(x)).float().squeeze(1)                 # [B] scores

    def training_step(self, batch, ctx):
        real = batch["views"][0][0]                                               # [B, 3, S, S] in [-1, 1]
        z = torch.randn(real.shape[0], self.latent_dim, device=real.device, dtype=real.dtype)
        if ctx.phase == "g":
            s = self.discriminate(self.generator(z))
            return {"loss": (-s if self.loss == "hinge" else F.softplus(-s)).mean()}
        with torch.no_grad():
            fake = self.generator(z)
        if self.r1 > 0:
            real = real.detach().requires_grad_(True)
        s_real, s_fake = self.discriminate(real), self.discriminate(fake)
        if self.loss == "hinge":
            loss = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
        else:
            loss = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
        out = {"real_score": s_real.detach().mean(), "fake_score": s_fake.detach().mean()}
        if self.r1 > 0:
            (g,) = torch.autograd.grad(s_real.sum(), real, create_graph=True)
            penalty = g.float().pow(2).flatten(1).sum(1).mean()
            loss = loss + 0.5 * self.r1 * penalty
            out["r1"] = penalty.detach()
        return {"loss": loss, **out}

    def after_step(self, ctx):
        self.ema.update(self.ema_decay)

    @torch.no_grad()
    def sample(self, n, generator=None, **kwargs):
        was = self.generator_ema.training
        self.generator_ema.eval()
        x = self.generator_ema(randn((n, self.latent_dim), generator, self._device()))
        self.generator_ema.train(was)
        return x
