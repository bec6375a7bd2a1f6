"""Projection heads."""
from __future__ import annotations

import torch.nn as nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """SimCLR/MoCo-style MLP: (Linear -> BN -> ReLU) x (num_layers-1) -> Linear [-> BN(affine=False)]."""
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
