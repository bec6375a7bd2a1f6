"""BYOL (Grill et al. 2020): an online network predicts a slowly moving target network's projection of
another view of the same image; no negatives.

For two views x1, x2 of B local samples:
    p_i = predictor(projector(backbone(x_i)))              [B, D]  online, with gradients
    z_i = key_projector(key_backbone(x_i))                  [B, D]  target (EMA of the online), no gradients
    loss = mean_b [ l(p1_b, z2_b) + l(p2_b, z1_b) ],   l(p, z) = |p/|p| - z/|z||^2 = 2 - 2 cos(p, z)
The target's weights follow the online ones, target <- tau * target + (1 - tau) * online once per
optimizer step, with tau on a cosine from `momentum` (0.996) to 1 (MomentumMethod). As in the official
code (deepmind-research/byol), each view goes through each network in a forward of its own (BatchNorm
statistics per view; the target runs in training mode on its own batch statistics and keeps its own
running averages), and BN is global across devices (sync_bn). Projector and predictor are BYOL's MLP:
Linear -> BN -> ReLU -> Linear (4096 -> 256), the last Linear without bias (networks.py); the hidden
Linear drops its bias too, which BN cancels exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.views import ViewSpec
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer

#: BYOL's asymmetric augmentation (Grill et al. 2020, table 6; deepmind-research/byol utils/augmentations.py):
#: crop 8-100% of the area, aspect 3/4-4/3, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale
#: 0.2; Gaussian blur (kernel 10% of the side, sigma 0.1-2) with p 1.0 / 0.1, solarization p 0.0 / 0.2.
#: MoCo v3 uses the same pair (moco_v3.py imports it; facebookresearch/moco-v3 main_moco.py, --crop-min 0.08,
#: 0.2 in its ResNet-50 runs).
VIEW_1 = ViewSpec(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                  contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2, blur_p=1.0, blur_sigma=(0.1, 2.0),
                  blur_kernel_frac=0.1, solarize_p=0.0)
VIEW_2 = VIEW_1.replace(blur_p=0.1, solarize_p=0.2)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample normalised MSE, 2 - 2 cos(p, z): [B, D], [B, D] -> [B] (in float32)."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)


@METHODS.register("byol")
class BYOL(MomentumMethod):
    views = (VIEW_1, VIEW_2)
    defaults = {
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "pred_hidden_dim": 4096,
        # tau from 0.996 (0.99 for the 100/300-epoch runs, 0.97 for 40) to 1 at the last step, as the paper
        "momentum": {"shape": "cosine", "start": 0.996, "end": 1.0},
        "sync_bn": True,                 # BN statistics across devices (cross-replica BN in the official code)
    }
    checks = {**MomentumMethod.checks, "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "pred_hidden_dim": integer(1), "sync_bn": boolean()}
    #: per-sample loss averaged over the batch, BN global across ranks: W ranks x B == one process at W*B
    cross_rank_exact = True

    def __init__(self, backbone: nn.Module, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096, sync_bn=True):
        super().__init__(backbone)
        self.sync_bn = sync_bn
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, 2, last_bias=False)   # BYOL's MLP
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2, last_bias=False)
        self.init_momentum_encoder(["backbone", "projector"])   # key_backbone, key_projector: the target

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                        # each [B, 3, H, W]
        # one forward per view and network: BN statistics per view, as the official code
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in (v1, v2))   # [B, D] each
        with torch.no_grad():
            z1, z2 = (self.key_projector(self.key_backbone(v)) for v in (v1, v2))        # [B, D] each
        return {"loss": (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()}
