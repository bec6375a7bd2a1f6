"""SimCLR (Chen et al. 2020): two augmented views, MLP projector, NT-Xent over the global batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.data.views import ViewSpec
from pretrain.losses import nt_xent
from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, positive


#: SimCLR's ImageNet augmentation (Chen et al. 2020, appendix A; google-research/simclr data_util.py):
#: crop 8-100% of the area, flip, colour jitter of strength s = 1 (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8,
#: grayscale 0.2, Gaussian blur (kernel 10% of the side, sigma 0.1-2) with p 0.5, both views alike.
VIEW = ViewSpec(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.8,
                contrast=0.8, saturation=0.8, hue=0.2, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                blur_kernel_frac=0.1, solarize_p=0.0)


@METHODS.register("simclr")
class SimCLR(Method):
    views = (VIEW, VIEW)
    cross_rank_exact = True   # global BN and negatives from every rank: tests/test_rank_equivalence.py
    defaults = {
        "temperature": 0.2,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "proj_layers": 2,
        "sync_bn": True,   # global BN statistics across ranks (as in the paper)
    }
    checks = {"temperature": positive(), "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "proj_layers": integer(1), "sync_bn": boolean()}

    def __init__(self, backbone: nn.Module, temperature=0.2, proj_hidden_dim=2048, proj_dim=128, proj_layers=2, sync_bn=True):
        super().__init__(backbone)
        self.temperature = temperature
        self.sync_bn = sync_bn
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers)

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                  # each [B, 3, H, W]
        B = v1.shape[0]
        # One backbone pass over both views: BN sees 2B samples, as in the reference code.
        z = self.projector(self.backbone(torch.cat([v1, v2], 0)))   # [2B, proj_dim]
        loss = nt_xent(z[:B], z[B:], self.temperature)
        return {"loss": loss}
