"""SimCLR (Chen et al. 2020): two augmented views, MLP projector, NT-Xent over the global batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.losses import nt_xent
from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head


@METHODS.register("simclr")
class SimCLR(Method):
    defaults = {
        "temperature": 0.2,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "proj_layers": 2,
        "sync_bn": True,   # global BN statistics across ranks (as in the paper)
    }

    def __init__(self, backbone: nn.Module, temperature=0.2, proj_hidden_dim=2048, proj_dim=128, proj_layers=2, sync_bn=True):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.sync_bn = sync_bn
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers)

    def training_step(self, batch):
        v1, v2 = batch["views"]                     # each [B, 3, H, W]
        B = v1.shape[0]
        # One backbone pass over both views: BN sees 2B samples, as in the reference code.
        z = self.projector(self.backbone(torch.cat([v1, v2], 0)))   # [2B, proj_dim]
        loss = nt_xent(z[:B], z[B:], self.temperature)
        return {"loss": loss}
