"""Projection heads."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
             bn: bool = True, last_bias: Optional[bool] = None) -> nn.Sequential:
    """SimCLR/MoCo-style MLP: (Linear -> BN -> ReLU) x (num_layers-1) -> Linear [-> BN(affine=False)].

    bn=False: hidden layers are Linear (with bias) -> ReLU, as MoCo v2's official head.
    last_bias: whether the last Linear has a bias (None: unless last_bn; Barlow Twins and VICReg: False)."""
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=not bn)] + ([nn.BatchNorm1d(hidden_dim)] if bn else [])
        layers.append(nn.ReLU(inplace=True))
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=(not last_bn) if last_bias is None else last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class _WeightNormLinear(nn.Module):
    """Linear(in_dim, out_dim, bias=False) with W = g * v / ||v||_row, computed inside this module's forward.

    Not torch.nn.utils.weight_norm / parametrizations.weight_norm: those rebuild `weight` in a forward
    pre-hook or on attribute access, outside this module's forward, where DeepSpeed ZeRO-3 has not gathered
    the partitioned v and g (it gathers a module's own parameters around that module's forward). Here v and
    g are ordinary parameters (named weight_v [out, in], weight_g [out, 1] as in the official checkpoints)
    used only in forward. The row norm is taken in float32: in fp16 it is inf once ||v|| > 65504 (a
    hand-written sum of squares once ||v||^2 is), and ||v|| only grows in training (its gradient is orthogonal to v)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # nn.Linear's init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def weight(self) -> torch.Tensor:
        """W [out, in] in float32."""
        v = self.weight_v.float()
        return self.weight_g.float() * v / v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [N, in] -> [N, out] in x's dtype
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    """DINO/iBOT/DINOv2 head: MLP (Linear [-> BN] -> GELU) x (num_layers-1) -> Linear to bottleneck_dim,
    L2-normalise, weight-normalised Linear(bottleneck_dim, out_dim, bias=False) -> logits [N, out_dim].

    norm_last_layer: the last layer's g stays 1 (frozen), so |logit| <= 1 (cosine of the normalised
    bottleneck and a prototype row); False: g is trained. MLP Linears: trunc_normal(std 0.02), zero bias;
    the last layer's v keeps nn.Linear's init and g starts at 1 (as the official code). Output dtype: the MLP's
    (the autocast dtype under autocast, else the weights'); the L2 normalisation and W are computed in float32."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(num_layers, 1) - 1)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], bottleneck_dim))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def last_layer_params(self) -> List[nn.Parameter]:
        """The last layer's trainable parameters (v, and g unless norm_last_layer), for the early-epoch freeze."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [N, in_dim] -> [N, out_dim]
        z = self.mlp(x)                                                  # [N, bottleneck]
        return self.last_layer(F.normalize(z.float(), dim=-1).to(z.dtype))
