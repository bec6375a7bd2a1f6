"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): the linear interpolant between data
and noise, and a network that regresses its velocity,

    x_t = (1 - t) x_0 + t eps,      eps ~ N(0, I),     t in [0, 1]  (t = 0: data, t = 1: noise)
    loss = |v_hat(x_t, t) - (eps - x_0)|^2

with t ~ U[0, 1] or logit-normal (sigmoid of N(m, s^2): SD3's "rf/lognorm(0.00, 1.00)", Esser et al. 2024), and
samples drawn by integrating dx/dt = v_hat from t = 1 to 0 with Euler or Heun steps on a uniform grid. The
denoiser (UNet or DiT), EMA, class conditioning with CFG and latent space come from DenoisingMethod.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from pretrain.methods.denoising import DENOISING_CHECKS, DENOISING_DEFAULTS, DenoisingMethod
from pretrain.methods.generative import randn
from pretrain.methods.registry import METHODS
from pretrain.params import Rule, choice, integer, positive

#: the network sees t on the 0..1000 scale of DDPM timesteps (its sinusoidal embedding's frequencies)
TIME_SCALE = 1000.0


@METHODS.register("flow")
class Flow(DenoisingMethod):
    defaults = {**DENOISING_DEFAULTS, "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                "sampler": "heun", "sample_steps": 50, "ema_decay": 0.9999}
    checks = {**DENOISING_CHECKS, "time_sampling": choice("uniform", "logit_normal"), "logit_std": positive(),
              "logit_mean": Rule("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v), ("x", float("nan"))),
              "sampler": choice("euler", "heun"), "sample_steps": integer(1)}

    def __init__(self, backbone: Optional[nn.Module], time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                 sampler="heun", sample_steps=50, image_size=32, **denoising):
        super().__init__(backbone, image_size, **denoising)
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.sampler, self.sample_steps = self.check_sampler(sampler, sample_steps)

    @staticmethod
    def check_sampler(sampler, steps):
        if sampler not in ("euler", "heun"):
            raise ValueError(f"the flow sampler must be euler or heun, got {sampler!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the sampler's step count must be an integer >= 1, got {steps}")
        return sampler, steps

    def draw_t(self, n: int, device) -> torch.Tensor:
        """Training times t [n] in (0, 1): uniform, or logit-normal (more weight on the middle of the path)."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    def velocity(self, net, x, t, y=None, cfg: float = 1.0) -> torch.Tensor:
        """v_hat(x [n, C, S, S], t [n] in [0, 1]) as fp32, guided by `cfg` when y is given."""
        return self.guided(net, x, t * TIME_SCALE, y, cfg)

    def training_step(self, batch, ctx):
        x0 = self.model_inputs(batch)                     # [B, C, S, S]: [-1, 1] pixels or scaled latents
        t = self.draw_t(x0.shape[0], x0.device)                       # [B]
        x_t, target = self.interpolant(x0, torch.randn_like(x0), t)
        v = self.net(x_t, t * TIME_SCALE, self.train_labels(batch)).float()
        return {"loss": (v - target).pow(2).mean()}

    @staticmethod
    def interpolant(x0, eps, t):
        """(x_t, velocity target) for data x0 [B, ...], noise eps [B, ...] and times t [B]: the straight line
        x_t = (1 - t) x0 + t eps and its time derivative eps - x0."""
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - tb) * x0 + tb * eps, eps - x0

    @torch.no_grad()
    def sample(self, n, generator=None, steps=None, sampler=None, cfg=None, classes=None, **kwargs):
        """n images [n, 3, S, S] in [-1, 1]: noise at t = 1 integrated to t = 0 with `steps` Euler or Heun steps
        (Heun: 2 network calls per step) of the EMA velocity; `classes` / `cfg` as DDPM's."""
        sampler, steps = self.check_sampler(sampler or self.sampler, self.sample_steps if steps is None else steps)
        y, cfg = self.sample_labels(n, classes), self.guidance if cfg is None else cfg
        dev = self._device()
        x = randn((n, *self.space), generator, dev)
        ts = torch.linspace(1, 0, steps + 1, device=dev)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = self.ode_step(self.net_ema, x, t, t_next, sampler, y, cfg)
        return self.from_space(x)

    @torch.no_grad()
    def ode_step(self, net, x, t, t_next, sampler: str = "heun", y=None, cfg: float = 1.0) -> torch.Tensor:
        """x at t -> x at t_next < t. Euler: x + (t_next - t) v(x, t). Heun (the trapezoid rule with an Euler
        predictor): x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2."""
        h, tt = t_next - t, t.expand(x.shape[0])
        v = self.velocity(net, x, tt, y, cfg)
        x_euler = x + h * v
        if sampler == "euler":
            return x_euler
        return x + h * 0.5 * (v + self.velocity(net, x_euler, t_next.expand(x.shape[0]), y, cfg))
