"""VICReg (Bardes, Ponce & LeCun 2022): variance-invariance-covariance regularisation of two views' embeddings.

For two views of B local samples on each of W ranks (N = W*B), z_v = expander(backbone(x_v)) [B, D]:
    invariance = mean over the B*D entries of (z_1 - z_2)^2            this rank's samples (as the official code)
    Z_v        = z_v of all ranks, gathered with gradients, centred     [N, D]
    variance   = (mean_d relu(1 - sqrt(var(Z_1)_d + 1e-4)) + the same for Z_2) / 2      var: unbiased (N - 1)
    covariance = sum_{i != j} C(Z_1)_ij^2 / D + the same for Z_2,  C(Z) = Z.T @ Z / (N - 1)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance      (25, 25, 1)
as the official main_vicreg.py (which halves the variance sum and not the covariance sum; the paper's eq. 6
halves neither). Each view goes through the network in its own forward (BN statistics per view).

Across ranks: the gather's backward sums the W ranks' gradients, so each rank receives the gradient of the
sum of the W (equal) variance/covariance terms; DDP averages the ranks' parameter gradients, which makes
them the gradient of one global term, and averages the per-rank invariance terms of equal B into the
global mean. W ranks x B equal one process x W*B in loss (averaged over ranks) and gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.losses import gather_with_grad
from pretrain.methods.barlow_twins import off_diagonal
from pretrain.methods.base import Method
from pretrain.methods.byol import VIEW_1, VIEW_2
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, non_negative


def variance_covariance(z: torch.Tensor, eps: float = 1e-4):
    """z [N, D], the embeddings of the whole global batch -> (mean_d relu(1 - std_d), sum_{i!=j} C_ij^2 / D),
    std from the unbiased variance, C = centred z.T @ z / (N - 1)."""
    z = z.float()
    N, D = z.shape
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + eps)                                   # [D], unbiased, as torch's default
    cov = z.T @ z / (N - 1)                                                # [D, D]
    return F.relu(1 - std).mean(), off_diagonal(cov).pow(2).sum() / D


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor):
    """(invariance, variance, covariance) of this rank's embeddings z1, z2 [B, D]; variance and covariance
    over the embeddings of all ranks, gathered with gradients."""
    inv = F.mse_loss(z1.float(), z2.float())
    (var1, cov1), (var2, cov2) = (variance_covariance(gather_with_grad(z)) for z in (z1, z2))
    return inv, (var1 + var2) / 2, cov1 + cov2


@METHODS.register("vicreg")
class VICReg(Method):
    #: BYOL's asymmetric pair: the official augmentations.py (blur 1.0 / 0.1, solarize 0 / 0.2)
    views = (VIEW_1, VIEW_2)
    cross_rank_exact = True
    defaults = {
        "proj_hidden_dim": 8192,
        "proj_dim": 8192,
        "proj_layers": 3,
        "sim_coeff": 25.0,       # invariance
        "std_coeff": 25.0,       # variance
        "cov_coeff": 1.0,        # covariance
        "sync_bn": True,         # the expander's BN over the global batch (official: SyncBatchNorm)
    }
    checks = {"proj_hidden_dim": integer(1), "proj_dim": integer(1), "proj_layers": integer(1),
              "sim_coeff": non_negative(), "std_coeff": non_negative(), "cov_coeff": non_negative(), "sync_bn": boolean()}

    def __init__(self, backbone: nn.Module, proj_hidden_dim=8192, proj_dim=8192, proj_layers=3, sim_coeff=25.0,
                 std_coeff=25.0, cov_coeff=1.0, sync_bn=True):
        super().__init__(backbone)
        self.sim_coeff, self.std_coeff, self.cov_coeff, self.sync_bn = sim_coeff, std_coeff, cov_coeff, sync_bn
        # official expander: Linear -> BN -> ReLU, twice, then Linear without bias (the hidden Linears' biases,
        # which the BN after them cancels, are left out here)
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bias=False)

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                   # each [B, 3, H, W]
        z1, z2 = (self.projector(self.backbone(v)) for v in (v1, v2))   # [B, D] each, per-view BN
        inv, var, cov = vicreg_terms(z1, z2)
        loss = self.sim_coeff * inv + self.std_coeff * var + self.cov_coeff * cov
        return {"loss": loss, "invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
