"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity.

For two views x1, x2 of B local samples on each of W ranks (N = W*B):
    z_v = bn(projector(backbone(x_v)))           [B, D]  bn: BatchNorm1d(affine=False) over the GLOBAL batch
    c   = sum_ranks z_1.T @ z_2 / N               [D, D]  the cross-correlation of the global batch
    loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2
Each view goes through the network in its own forward (BN statistics per view), as the official main.py.

Across ranks: c is the SUM of the per-rank products (each divided by the global N), through an all-reduce
whose backward is an all-reduce too (pretrain.losses.all_reduce_sum_with_grad). Every rank then holds the
global loss; the backward hands each rank the gradient of the sum of the W ranks' (equal) losses, and
DDP's average of the W ranks' gradients is the gradient of the one global loss: W ranks x B equal one
process x W*B. The official code's in-place `torch.distributed.all_reduce` has no backward, so its
gradients are 1/W of that (see docs/methods.md); a mean of per-rank matrices normalised with per-rank BN
statistics (solo-learn's loss) is another matrix altogether.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.comm import world_size
from pretrain.losses import all_reduce_sum_with_grad
from pretrain.methods.base import Method
from pretrain.methods.byol import VIEW_1, VIEW_2
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, non_negative, positive


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The D*(D-1) off-diagonal entries of a square [D, D] matrix, flattened."""
    D = m.shape[0]
    return m.flatten()[:-1].view(D - 1, D + 1)[:, 1:].flatten()


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """[B, D] x [B, D] on each rank (already normalised over the global batch) -> [D, D]: the sum over
    ranks of z1.T @ z2, divided by the global batch W*B, in fp32, with the cross-rank backward."""
    n = z1.shape[0] * world_size()
    return all_reduce_sum_with_grad(z1.float().T @ z2.float()) / n


def barlow_twins_loss(c: torch.Tensor, lambd: float):
    """(loss, on-diagonal term, off-diagonal term) of a [D, D] cross-correlation matrix."""
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


@METHODS.register("barlow_twins")
class BarlowTwins(Method):
    #: BYOL's asymmetric pair: the official main.py Transform (blur 1.0 / 0.1, solarize 0 / 0.2)
    views = (VIEW_1, VIEW_2)
    cross_rank_exact = True
    defaults = {
        "proj_hidden_dim": 8192,
        "proj_dim": 8192,
        "proj_layers": 3,
        "lambd": 0.005,          # the paper's 5e-3 (official main.py: 0.0051)
        "bias_lr_scale": 0.024,  # biases and BN parameters: lr 0.0048 against the weights' 0.2
        "sync_bn": True,         # BN statistics of the global batch, the embeddings' normalisation included
    }
    checks = {"proj_hidden_dim": integer(1), "proj_dim": integer(1), "proj_layers": integer(1),
              "lambd": non_negative(), "bias_lr_scale": positive(), "sync_bn": boolean()}

    def __init__(self, backbone: nn.Module, proj_hidden_dim=8192, proj_dim=8192, proj_layers=3, lambd=0.005,
                 bias_lr_scale=0.024, sync_bn=True):
        super().__init__(backbone)
        self.lambd, self.bias_lr_scale, self.sync_bn = lambd, bias_lr_scale, sync_bn
        # official: Linear (no bias) -> BN -> ReLU, twice, then Linear (no bias)
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bias=False)
        self.bn = nn.BatchNorm1d(proj_dim, affine=False)   # the embeddings' normalisation over the batch

    def param_groups(self, weight_decay: float, phase: str = "main"):
        """The paper's two learning rates: biases and BN parameters (the no-decay, LARS-excluded group)
        at `bias_lr_scale` times the weights' LR."""
        groups = super().param_groups(weight_decay, phase)
        for g in groups:
            if g.get("lars_exclude"):
                g["lr_scale"] = self.bias_lr_scale
        return groups

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                   # each [B, 3, H, W]
        z1, z2 = (self.bn(self.projector(self.backbone(v))) for v in (v1, v2))   # [B, D] each, per-view BN
        loss, on_diag, off_diag = barlow_twins_loss(cross_correlation(z1, z2), self.lambd)
        return {"loss": loss, "on_diag": on_diag.detach(), "off_diag": off_diag.detach()}
