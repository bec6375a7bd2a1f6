"""SimSiam (Chen & He 2021): a siamese network whose predictor output for one view regresses the other
view's projection under a stop-gradient; no negatives, no momentum encoder.

For two views x1, x2 of B local samples:
    z_i = projector(backbone(x_i))     [B, D]      p_i = predictor(z_i)     [B, D]
    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,    D(p, z) = -mean_b cos(p_b, z_b)
As in the official code (facebookresearch/simsiam builder.py): each view is encoded in a forward of its
own (BatchNorm statistics per view); the projector is 3 layers of Linear (no bias) -> BN, ReLU after
the first two, the last BN without affine parameters; the predictor a bottleneck Linear (no bias) -> BN
-> ReLU -> Linear (2048 -> 512 -> 2048); BN is synchronised across GPUs (sync_bn). With fix_pred_lr
(the official README's command) the predictor's parameter groups carry `fixed_lr`: they keep the peak
LR while the rest follows the schedule.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.methods.base import Method
from pretrain.methods.moco_v2 import VIEW as MOCO_V2_VIEW
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, optional


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, sg(z)): -mean_b cos(p_b, z_b) over [B, D] inputs, no gradient into z (float32)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


@METHODS.register("simsiam")
class SimSiam(Method):
    #: MoCo v2's augmentation, both views alike (main_simsiam.py: crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1)
    #: p 0.8, grayscale 0.2, blur sigma 0.1-2 p 0.5, flip)
    views = (MOCO_V2_VIEW, MOCO_V2_VIEW)
    defaults = {
        "proj_hidden_dim": None,    # null: the backbone's width, as the official code (2048 for a ResNet-50)
        "proj_dim": 2048,
        "proj_layers": 3,           # 2 in the paper's CIFAR-10 runs
        "pred_hidden_dim": 512,     # the bottleneck
        "fix_pred_lr": True,        # the predictor keeps the peak LR (main_simsiam.py --fix-pred-lr)
        "sync_bn": True,
    }
    checks = {"proj_hidden_dim": optional(integer(1)), "proj_dim": integer(1), "proj_layers": integer(1),
              "pred_hidden_dim": integer(1), "fix_pred_lr": boolean(), "sync_bn": boolean()}
    #: per-sample loss averaged over the batch, BN global across ranks: W ranks x B == one process at W*B
    cross_rank_exact = True

    def __init__(self, backbone: nn.Module, proj_hidden_dim=None, proj_dim=2048, proj_layers=3, pred_hidden_dim=512,
                 fix_pred_lr=True, sync_bn=True):
        super().__init__(backbone)
        self.fix_pred_lr, self.sync_bn = fix_pred_lr, sync_bn
        width = backbone.num_features
        self.projector = mlp_head(width, proj_hidden_dim or width, proj_dim, proj_layers, last_bn=True)
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2)

    def param_groups(self, weight_decay: float, phase: str = "main") -> List[dict]:
        """The base groups (weight decay / none), each split into the predictor's parameters, which
        carry `fixed_lr` when fix_pred_lr is on, and the rest."""
        groups = super().param_groups(weight_decay, phase)
        if not self.fix_pred_lr:
            return groups
        pred = {id(p) for p in self.predictor.parameters()}
        out = []
        for g in groups:
            rest = [p for p in g["params"] if id(p) not in pred]
            mine = [p for p in g["params"] if id(p) in pred]
            out += [{**g, "params": rest}] + ([{**g, "params": mine, "fixed_lr": True}] if mine else [])
        return out

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                   # each [B, 3, H, W]
        z1, z2 = (self.projector(self.backbone(v)) for v in (v1, v2))   # [B, D] each, one forward per view
        p1, p2 = self.predictor(z1), self.predictor(z2)               # [B, D] each
        return {"loss": negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2}
