"""MoCo v3 (Chen, Xie & He 2021): symmetric InfoNCE between a predictor's output and a momentum
encoder's keys, negatives from the whole global batch (no queue), built for ViTs.

For two views x1, x2 of B local samples:
    q_i = predictor(projector(backbone(x_i)))              [B, D]  with gradients
    k_i = key_projector(key_backbone(x_i))                  [B, D]  momentum encoder, no gradients
    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2T * InfoNCE(q, keys of all ranks)
The projector (3 layers) and predictor (2 layers) end in BatchNorm without affine parameters, and
their BN is global across ranks, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.data.views import ViewSpec
from pretrain.losses import info_nce
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head


#: BYOL's asymmetric augmentation (Grill et al. 2020, table 6), as MoCo v3 uses it (facebookresearch/moco-v3
#: main_moco.py): crop 8-100% (--crop-min 0.08; the official ResNet-50 runs use 0.2), colour jitter
#: (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, flip; blur p 1.0 / 0.1, solarization p 0 / 0.2.
VIEW_1 = ViewSpec(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                  contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2, blur_p=1.0, blur_sigma=(0.1, 2.0),
                  blur_kernel_frac=0.1, solarize_p=0.0)
VIEW_2 = VIEW_1.replace(blur_p=0.1, solarize_p=0.2)


@METHODS.register("moco_v3")
class MoCoV3(MomentumMethod):
    views = (VIEW_1, VIEW_2)
    defaults = {
        "temperature": 0.2,
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "proj_layers": 3,
        "pred_hidden_dim": 4096,
        "momentum": 0.99,
        "momentum_schedule": "cosine",   # 0.99 -> 1.0 over training, as in the paper
        "sync_bn": True,
    }

    def __init__(self, backbone: nn.Module, temperature=0.2, proj_hidden_dim=4096, proj_dim=256, proj_layers=3,
                 pred_hidden_dim=4096, momentum=0.99, momentum_schedule="cosine", sync_bn=True):
        super().__init__(backbone, momentum, momentum_schedule)
        if temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature}")
        self.temperature, self.sync_bn = temperature, sync_bn
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bn=True)
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2, last_bn=True)
        self.init_momentum_encoder(["backbone", "projector"])

    def _ctr(self, q, k):
        # x 2T: the paper's scaling, which makes the gradient scale independent of the temperature
        return info_nce(q, k, self.temperature, grad_through_keys=False) * 2 * self.temperature

    def training_step(self, batch):
        v1, v2 = batch["views"]                                         # each [B, 3, H, W]
        B = v1.shape[0]
        x = torch.cat([v1, v2], 0)                                      # [2B, ...]: one pass per encoder
        q = self.predictor(self.projector(self.backbone(x)))            # [2B, D]
        with torch.no_grad():
            k = self.key_projector(self.key_backbone(x))                # [2B, D]
        loss = self._ctr(q[:B], k[B:]) + self._ctr(q[B:], k[:B])
        return {"loss": loss}
