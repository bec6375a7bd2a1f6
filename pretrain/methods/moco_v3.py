"""MoCo v3 (Chen, Xie & He 2021): symmetric InfoNCE between a predictor's output and a momentum
encoder's keys, negatives from the whole global batch (no queue), built for ViTs.

For two views x1, x2 of B local samples:
    q_i = predictor(projector(backbone(x_i)))              [B, D]  with gradients
    k_i = key_projector(key_backbone(x_i))                  [B, D]  momentum encoder, no gradients
    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2T * InfoNCE(q, keys of all ranks)
Each view goes through each encoder in its own forward, so BatchNorm statistics are per view, as in
the official code. The projector (3 layers; the official ResNet head has 2) ends in BatchNorm without
affine parameters, as does the predictor (2 layers) unless pred_last_bn is off (the official ResNet
predictor); their BN is global across ranks, as in the paper. The views are BYOL's asymmetric pair.
stop_grad_conv1 freezes a ViT's random patch projection (patch_embed.proj), the paper's stabiliser.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.losses import info_nce
from pretrain.methods.byol import VIEW_1, VIEW_2   # BYOL's asymmetric pair (crop 0.08-1, blur 1.0 / 0.1, solarize 0 / 0.2)
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, positive


def freeze_patch_projection(backbone: nn.Module, model_hint: str = "the backbone") -> None:
    """MoCo v3's stop_grad_conv1: the ViT's patch projection keeps its random initial weights."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Module) or not list(proj.parameters()):
        raise ValueError(f"method.stop_grad_conv1 freezes a ViT's patch projection (patch_embed.proj), which "
                         f"{model_hint} does not have; use a timm ViT or set method.stop_grad_conv1=false")
    for p in proj.parameters():
        p.requires_grad_(False)


@METHODS.register("moco_v3")
class MoCoV3(MomentumMethod):
    views = (VIEW_1, VIEW_2)
    cross_rank_exact = True   # global BN and negatives from every rank: tests/test_rank_equivalence.py
    defaults = {
        "temperature": 0.2,
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "proj_layers": 3,
        "pred_hidden_dim": 4096,
        "momentum": {"shape": "cosine", "start": 0.99, "end": 1.0},   # 0.99 -> 1.0 over training, as in the paper
        "sync_bn": True,
        "pred_last_bn": True,            # the predictor ends in BN (official ViT head; its ResNet head does not)
        "stop_grad_conv1": False,        # ViTs: freeze the random patch projection (on in the paper's ViT runs)
    }
    checks = {**MomentumMethod.checks, "temperature": positive(), "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "proj_layers": integer(1), "pred_hidden_dim": integer(1), "sync_bn": boolean(), "pred_last_bn": boolean(),
              "stop_grad_conv1": boolean()}

    def __init__(self, backbone: nn.Module, temperature=0.2, proj_hidden_dim=4096, proj_dim=256, proj_layers=3,
                 pred_hidden_dim=4096, sync_bn=True, pred_last_bn=True,
                 stop_grad_conv1=False):
        super().__init__(backbone)
        self.temperature, self.sync_bn = temperature, sync_bn
        if stop_grad_conv1:
            freeze_patch_projection(backbone, f"the backbone ({type(backbone).__name__})")
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bn=True)
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2, last_bn=pred_last_bn)
        self.init_momentum_encoder(["backbone", "projector"])

    def _ctr(self, q, k):
        # x 2T: the paper's scaling, which makes the gradient scale independent of the temperature
        return info_nce(q, k, self.temperature, grad_through_keys=False) * 2 * self.temperature

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                      # each [B, 3, H, W]
        # one forward per view and encoder: BN statistics per view, as the official code
        q1, q2 = (self.predictor(self.projector(self.backbone(v))) for v in (v1, v2))   # [B, D] each
        with torch.no_grad():
            k1, k2 = (self.key_projector(self.key_backbone(v)) for v in (v1, v2))        # [B, D] each
        return {"loss": self._ctr(q1, k2) + self._ctr(q2, k1)}
