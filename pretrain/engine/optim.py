"""Optimizers: LARS (SimCLR's) and AdamW/SGD, over the method's parameter groups."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as used by SimCLR.

    Groups with `lars_exclude=True` (biases, norm parameters) get neither weight decay nor the
    trust ratio.
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        g["trust_coefficient"] * w_norm / (d_norm + g["eps"]),
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(param_groups, cfg) -> torch.optim.Optimizer:
    """`cfg` is the `optim` config section. Each group keeps its own weight_decay."""
    name = cfg.name
    if name == "lars":
        return LARS(param_groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in param_groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optim.name must be lars, adamw or sgd, got {name!r}")
