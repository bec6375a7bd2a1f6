"""Projection heads."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn


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
