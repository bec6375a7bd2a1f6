"""DDPM (Ho et al. 2020) with a UNet or a DiT (pretrain/methods/denoising.py: class conditioning, classifier-free
guidance, latent space), linear or cosine noise schedule (Nichol & Dhariwal 2021), eps- or v-prediction, an EMA
of the weights, and DDPM (ancestral) and DDIM (Song et al. 2021) samplers.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,      t ~ U{1..T}
    loss = |eps - eps_hat(x_t, t)|^2         or   |v - v_hat|^2,  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
`bits_per_dim` estimates the variational bound (L_T + sum_t L_{t-1} + L_0, the sum by Monte Carlo
over `bound_samples` strata of timesteps, or exactly when bound_samples >= T - 1) with the EMA weights and a discretized Gaussian decoder.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from pretrain.losses.likelihood import discretized_log_prob
from pretrain.methods.denoising import DENOISING_CHECKS, DENOISING_DEFAULTS, DenoisingMethod
from pretrain.methods.generative import randn
from pretrain.methods.registry import METHODS
from pretrain.params import boolean, choice, integer


def betas_for(schedule: str, T: int) -> torch.Tensor:
    if schedule == "linear":
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"method.schedule must be linear or cosine, got {schedule!r}")


def posterior(x_t, x0, abar_t, abar_prev):
    """Mean and variance of q(x_prev | x_t, x_0), where the step from abar_prev to abar_t has
    beta = 1 - abar_t / abar_prev (one DDPM step, or a strided one when sampling with fewer steps)."""
    beta = 1 - abar_t / abar_prev
    mean = (abar_prev.sqrt() * beta / (1 - abar_t)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t
    return mean, beta * (1 - abar_prev) / (1 - abar_t)


@METHODS.register("ddpm")
class DDPM(DenoisingMethod):
    defaults = {**DENOISING_DEFAULTS, "timesteps": 1000, "schedule": "cosine", "prediction": "eps",
                "ema_decay": 0.999, "sample_steps": 50, "sampler": "ddim", "bound_samples": 32,
                "learn_sigma": False}
    checks = {**DENOISING_CHECKS, "timesteps": integer(2), "schedule": choice("linear", "cosine"),
              "prediction": choice("eps", "v"), "sample_steps": integer(1), "sampler": choice("ddpm", "ddim"),
              "bound_samples": integer(1), "learn_sigma": boolean()}

    def __init__(self, backbone: Optional[nn.Module], timesteps=1000, schedule="cosine", prediction="eps",
                 sample_steps=50, sampler="ddim", bound_samples=32, learn_sigma=False, image_size=32, **denoising):
        super().__init__(backbone, image_size, learn_sigma=learn_sigma, **denoising)
        self.learn_sigma = learn_sigma
        self.check_sampler(sampler, sample_steps, timesteps)
        self.T, self.prediction = timesteps, prediction
        self.sample_steps, self.sampler, self.bound_samples = sample_steps, sampler, bound_samples
        b = betas_for(schedule, timesteps)
        abar = torch.cumprod(1 - b, 0)
        # A function of the config, not state, and not a buffer: a module-wide cast (DeepSpeed's bf16/fp16
        # modes in older versions, .half()) must not round it. In bf16, abar rounds to 1 for the first ~21
        # of 1000 cosine timesteps, which would then get no noise. fp32 copies per device: `schedule`.
        abar_prev = torch.cat([torch.ones(1, dtype=b.dtype), abar[:-1]])
        self._schedule64 = {"betas": b, "abar": abar, "abar_prev": abar_prev}
        # the smallest variance a learned one interpolates to: beta~ of the first step is 0, so improved-diffusion's
        # posterior_log_variance_clipped uses the second step's beta~ there
        self._var_floor = float(b[1] * (1 - abar_prev[1]) / (1 - abar[1])) if timesteps > 1 else 1e-20
        self._schedule_on = {}

    @staticmethod
    def check_sampler(sampler, steps, T):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"the sampler's step count must be in [1, {T}] (method.timesteps), got {steps}")

    def schedule(self, name: str, device) -> torch.Tensor:
        """The schedule vector `name` (betas, abar or abar_prev) [T], fp32 on `device`, whatever the dtype
        of the weights or the batch."""
        key = (name, torch.device(device))
        if key not in self._schedule_on:
            self._schedule_on[key] = self._schedule64[name].to(key[1], torch.float32)
        return self._schedule_on[key]

    def _a(self, name, t, x):
        """schedule(name) at timesteps t [B], fp32, shaped [B, 1, ...] to broadcast over x [B, ...]."""
        return self.schedule(name, t.device)[t].view(-1, *[1] * (x.dim() - 1))

    def predict_eps_x0(self, net, x_t, t, y=None, cfg: float = 1.0):
        """(eps_hat, x0_hat) of `predict`."""
        return self.predict(net, x_t, t, y, cfg)[:2]

    def predict(self, net, x_t, t, y=None, cfg: float = 1.0, out=None):
        """The network's prediction (guided by `cfg` when y is given) as fp32 (eps_hat, x0_hat), whatever it was
        trained to predict. In pixel space x0_hat is clamped to [-1, 1] and eps_hat recomputed from the clamped
        x0_hat, eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), as in the DDIM and improved-diffusion code
        (`_predict_eps_from_xstart`): the pair stays on the line x_t = sqrt(abar) x0 + sqrt(1 - abar) eps that a
        DDIM step follows. (Latents have no such range: no clamp.) Third: the variance channels v [B, C, ...] of a
        learn_sigma model, else None. `out`: the network's output, when already computed (no clamp then: training)."""
        clamp = out is None
        out = self.guided(net, x_t, t, y, cfg) if out is None else out
        C = self.space[0]
        out, v = out[:, :C], (out[:, C:] if self.learn_sigma else None)
        xt = x_t.float()
        abar = self._a("abar", t, xt)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = (xt - s * out) / a if self.prediction == "eps" else a * xt - s * out   # v = a eps - s x0
        if self.autoencoder is None and clamp:
            x0 = x0.clamp(-1, 1)
        return (xt - a * x0) / s, x0, v

    def model_log_var(self, v, abar_t, abar_prev):
        """log variance of p(x_prev | x_t) for the (strided) step abar_prev -> abar_t: with learn_sigma improved
        DDPM's interpolation (Nichol & Dhariwal 2021, eq. 15) log S = f log beta + (1 - f) log beta~, f = (v + 1) / 2,
        beta~ floored at the first step's (see _var_floor); else the fixed beta~ (the last step to x_0: beta)."""
        beta = 1 - abar_t / abar_prev
        tilde = beta * (1 - abar_prev) / (1 - abar_t)
        if v is None:
            return torch.where(abar_prev >= 1, beta, tilde).clamp(min=1e-20).log().expand_as(abar_t)
        f = (v.float() + 1) / 2
        return f * beta.log() + (1 - f) * tilde.clamp(min=self._var_floor).log()

    def vb_terms(self, x0, x_t, t, x0_hat, v) -> torch.Tensor:
        """The bound's term for step t [B] in nats per image [B]: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
        t > 0, -log p(x_0 | x_1) (a discretized Gaussian) for t = 0; p's mean from x0_hat, its variance from v."""
        abar_t, abar_prev = self._a("abar", t, x0), self._a("abar_prev", t, x0)
        m_true, var_true = posterior(x_t, x0, abar_t, abar_prev)
        m_model, _ = posterior(x_t, x0_hat, abar_t, abar_prev)
        lv_true, lv_model = var_true.clamp(min=1e-20).log(), self.model_log_var(v, abar_t, abar_prev)
        kl = 0.5 * (lv_model - lv_true + (lv_true - lv_model).exp() + (m_true - m_model).pow(2) * (-lv_model).exp() - 1)
        terms = kl.flatten(1).sum(1)                                                               # [B]
        first = t == 0   # only these rows go through the decoder (elsewhere its log of a far bin can be -inf)
        if first.any():
            nll = -discretized_log_prob(x0[first], m_model[first], 0.5 * lv_model.expand_as(x0)[first], "gaussian")
            terms = terms.masked_scatter(first, nll.flatten(1).sum(1))
        return terms

    def training_step(self, batch, ctx):
        # Schedule arithmetic and noising in fp32 whatever the engine dtype; the UNet casts its inputs
        # (x_t, the timestep embedding) to its weights' dtype.
        x0 = self.model_inputs(batch)                    # [B, C, S, S]: [-1, 1] pixels or scaled latents
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)          # index t = step t+1
        eps = torch.randn_like(x0)
        abar = self._a("abar", t, x0)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = self._noised(x0, t, eps)
        target = eps if self.prediction == "eps" else a * eps - s * x0
        out = self.net(x_t, t, self.train_labels(batch)).float()
        loss = (out[:, :x0.shape[1]] - target).pow(2).mean()
        if not self.learn_sigma:
            return {"loss": loss}
        # improved DDPM's hybrid loss as DiT trains it: + the bound's term, whose gradient reaches the variance only
        _, x0_hat, v = self.predict(self.net, x_t, t, out=torch.cat([out[:, :x0.shape[1]].detach(), out[:, x0.shape[1]:]], 1))
        vb = self.vb_terms(x0, x_t, t, x0_hat, v) / (x0[0].numel() * math.log(2))
        return {"loss": loss + vb.mean(), "mse": loss.detach(), "vb_bits_per_dim": vb.mean().detach()}

    @torch.no_grad()
    def sample(self, n, generator=None, steps=None, sampler=None, cfg=None, classes=None, **kwargs):
        """n images [n, 3, S, S] in [-1, 1] from the EMA denoiser; `classes` (one int, or [n]) and the guidance
        scale `cfg` (default method.guidance) for a class-conditional model."""
        steps = self.sample_steps if steps is None else steps
        sampler = sampler or self.sampler
        self.check_sampler(sampler, steps, self.T)
        y, cfg = self.sample_labels(n, classes), self.guidance if cfg is None else cfg
        dev = self._device()
        x = randn((n, *self.space), generator, dev)
        ts = torch.linspace(self.T - 1, 0, steps).round().long().unique_consecutive().tolist()
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            x = self.sampler_step(self.net_ema, x, t, t_prev, sampler, generator, y, cfg)
        return self.from_space(x)

    @torch.no_grad()
    def sampler_step(self, net, x, t: int, t_prev: int, sampler: str = "ddim", generator=None, y=None, cfg=1.0):
        """One reverse step of x [n, C, S, S] from timestep index t to t_prev (-1: to x_0). DDIM, eta = 0
        (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat; DDPM:
        ancestral, from the posterior q(x_prev | x_t, x0_hat) of the (strided) step."""
        dev = x.device
        eps, x0, v = self.predict(net, x, torch.full((x.shape[0],), t, dtype=torch.long, device=dev), y, cfg)
        abar = self.schedule("abar", dev)
        abar_t, abar_prev = abar[t], abar[t_prev] if t_prev >= 0 else torch.ones((), device=dev)
        if sampler == "ddim":
            return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        mean, var = posterior(x, x0, abar_t, abar_prev)
        if v is not None:   # the learned variance of this (strided) step
            var = self.model_log_var(v, abar_t, abar_prev).exp()
        return mean + (var.sqrt() * randn(x.shape, generator, dev) if t_prev >= 0 else 0)

    @torch.no_grad()
    def bits_per_dim(self, images, generator=None):
        """Monte Carlo estimate of the variational bound per image, bits/dim (EMA weights; the unconditional
        model of a class-conditional one). None in latent space: no bound on pixels."""
        if self.autoencoder is not None:
            return None
        x0, B, D = images.float(), images.shape[0], images[0].numel()
        T, net = self.T, self.net_ema

        # L_T: KL(q(x_T | x_0) || N(0, I))
        abT = self.schedule("abar", x0.device)[-1]
        mT, vT = abT.sqrt() * x0, (1 - abT)
        L_T = 0.5 * (mT.pow(2) + vT - 1 - torch.log(vT)).flatten(1).sum(1)
        # L_{t-1}, t = 2..T: KL between the true and the model posterior: every t when bound_samples >= T - 1, else
        # one t from each of bound_samples equal strata (less variance than uniform draws; the small-t terms are
        # large and rare)
        K = min(self.bound_samples, T - 1)
        edges = torch.linspace(1, T, K + 1).long()
        L_mid = torch.zeros(B, device=x0.device)
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            if K == T - 1:
                t = torch.full((B,), lo, dtype=torch.long)
            else:
                t = torch.randint(lo, max(hi, lo + 1), (B,), generator=generator, device="cpu")
            t, w = t.to(x0.device), (hi - lo) if K < T - 1 else 1
            x_t = self._noised(x0, t, randn(x0.shape, generator, x0.device))
            L_mid += w * self.vb_terms(x0, x_t, t, *self.predict(net, x_t, t)[1:])
        # L_0: -log p(x_0 | x_1), a discretized Gaussian around the predicted x_0
        t0 = torch.zeros(B, dtype=torch.long, device=x0.device)
        x1 = self._noised(x0, t0, randn(x0.shape, generator, x0.device))
        L_0 = self.vb_terms(x0, x1, t0, *self.predict(net, x1, t0)[1:])
        return (L_T + L_mid + L_0) / (D * math.log(2))

    def _noised(self, x0, t, eps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = self._a("abar", t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps
