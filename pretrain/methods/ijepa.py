"""I-JEPA (Assran et al. 2023): from one context block of an image, predict the representations of several target
blocks of the same image, in the feature space of an EMA target encoder; no augmented views, no pixels.

Per step, for B local images x [B, 3, S, S] with masks [1 + T, B, N] (drawn in the data pipeline by
`self.masking` = pretrain/data/masking.py MultiBlockMasking: view 0 the context, views 1..T the targets, True =
not in that set):

    c = keep_indices(masks[0])                    [B, K_c]     context patch indices
    t = keep_indices(masks[1:])                   [T, B, K_t]  each target block's patch indices
    s_x = backbone(x, context patches only)        [B, K_c, D]  context encoder (prefix tokens dropped)
    s_y = layer_norm(key_backbone(x))              [B, N, D]    target encoder (EMA), no gradient, gathered at t
    p = predictor(s_x, c, t)                       [T, B, K_t, D]
    loss = mean over T, B, K_t, D of (p - s_y[t])^2    (`loss: smooth_l1`: F.smooth_l1_loss, the official code's)

Predictor (official VisionTransformerPredictor): Linear(D -> pred_embed_dim), plus fixed 2-D sin-cos position
embeddings of the context positions; one mask token plus the target positions' embeddings per target patch; the
context repeated once per target block (batched, as the official `repeat_interleave_batch`); `pred_depth` timm
Blocks, LayerNorm, Linear back to D; the outputs at the mask tokens are the predictions.

The official ViT has no class token; a timm ViT may have one (and register tokens): they go through both encoders
and are dropped before the predictor and the targets, so the loss never reads them. Evaluation (`features`, the
kNN monitor): average-pooled patch tokens of the target encoder, as the paper; the configs build the ViT with
`class_token: false, global_pool: avg, fc_norm: false`, so the exported timm model's own forward is the same.

Checked against facebookresearch/ijepa (src/masks/multiblock.py, src/models/vision_transformer.py, src/train.py,
configs/in1k_vith14_ep300.yaml); deviations in docs/methods.md (I-JEPA).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from pretrain.data.masking import MultiBlockMasking
from pretrain.data.views import ViewSpec
from pretrain.methods.dino import no_drop_path
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models.backbone import run_blocks
from pretrain.models.vit import gather_tokens, is_vit, keep_indices, patch_grid, vit_tokens
from pretrain.params import choice, integer, optional, pair

log = logging.getLogger("pretrain.methods")

#: configs/in1k_vith14_ep300.yaml: RandomResizedCrop(scale 0.3-1) and nothing else (no flip, colour, blur)
VIEW = ViewSpec(crop_scale=(0.3, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """The mean over every element of (pred - target)^2 (`l2`) or of F.smooth_l1_loss (beta 1), in float32."""
    pred, target = pred.float(), target.float()
    return F.mse_loss(pred, target) if kind == "l2" else F.smooth_l1_loss(pred, target)


class Predictor(nn.Module):
    """I-JEPA's narrow predictor: context tokens [B, K_c, D] at positions [B, K_c] and target positions
    [T, B, K_t] of a (h, w) grid -> predictions [T, B, K_t, D]."""

    #: checkpoint the blocks like the backbone's (model.grad_checkpointing; set from the backbone by IJEPA)
    grad_checkpointing = False

    def __init__(self, embed_dim: int, grid, width: int = 384, depth: int = 12, num_heads: int = 12):
        super().__init__()
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        # fixed [h*w, width] table, row-major like the patches: [sin y, sin x, cos y, cos x] (y = row, x = column),
        # the official get_2d_sincos_pos_embed's values ([sin x, cos x, sin y, cos y]) in another channel order
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid), width), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(width)
        self.proj = nn.Linear(width, embed_dim)
        # the official init_model: every Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0); mask token 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        T, B, K_t = target_idx.shape
        x = self.embed(context) + self.pos_embed[context_idx]                        # [B, K_c, d]
        queries = self.mask_token + self.pos_embed[target_idx]                      # [T, B, K_t, d]
        x = torch.cat([x.unsqueeze(0).expand(T, -1, -1, -1), queries.to(x.dtype)], 2)   # [T, B, K_c + K_t, d]
        x = self.norm(run_blocks(self.blocks, x.flatten(0, 1), self.grad_checkpointing))[:, -K_t:]   # [T*B, K_t, d]
        return self.proj(x).view(T, B, K_t, -1)


@METHODS.register("ijepa")
class IJEPA(MomentumMethod):
    views = (VIEW,)
    defaults = {
        "pred_depth": 12,               # the paper's ViT-H/14 predictor (ViT-B: 6, ViT-G: 16)
        "pred_embed_dim": 384,
        "pred_num_heads": None,         # null: the encoder's (official)
        "num_targets": 4,
        "target_scale": [0.15, 0.2],
        "target_aspect": [0.75, 1.5],
        "context_scale": [0.85, 1.0],
        "min_keep": 10,
        "loss": "l2",                   # l2 (the paper, issue 14) | smooth_l1 (the official code)
        "momentum": {"shape": "linear", "start": 0.996, "end": 1.0},
    }
    checks = {**MomentumMethod.checks, "pred_depth": integer(1), "pred_embed_dim": integer(1),
              "pred_num_heads": optional(integer(1)), "num_targets": integer(1), "target_scale": pair(0, 1),
              "target_aspect": pair(0), "context_scale": pair(0, 1), "min_keep": integer(0),
              "loss": choice("l2", "smooth_l1")}
    requires_vit = True
    #: a per-element mean over [T, B, K_t, D] with the same K_c, K_t on every rank (one batch's masks split across
    #: ranks), per-sample encoders and predictor: W ranks x B equal one process at W*B (tests/test_rank_equivalence.py)
    cross_rank_exact = True

    def __init__(self, backbone: nn.Module, image_size: int = 224, pred_depth=12, pred_embed_dim=384,
                 pred_num_heads=None, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep=10, loss="l2"):
        if not is_vit(backbone):
            raise ValueError(f"method.name=ijepa encodes patch tokens, which needs a timm ViT, not "
                             f"{type(backbone).__name__}; set model.name=vit_* (see configs/digits_ijepa.yaml)")
        pooling = [getattr(backbone, n, None) for n in ("fc_norm", "attn_pool")]
        if any(p.requires_grad for m in pooling if m is not None for p in m.parameters()):
            raise ValueError("method.name=ijepa trains the patch tokens, so the ViT's pooling head (fc_norm / attn_pool, "
                             "timm's default with global_pool=avg/map) would get no gradient; set model.kwargs.fc_norm=false "
                             "(the final norm then runs on the tokens, as I-JEPA's encoder) and global_pool=avg")
        heads = pred_num_heads or backbone.blocks[0].attn.num_heads
        if pred_embed_dim % 4 or pred_embed_dim % heads:
            raise ValueError(f"method.pred_embed_dim={pred_embed_dim} must be a multiple of 4 (sin-cos position "
                             f"embedding) and of the predictor's {heads} heads (method.pred_num_heads)")
        if getattr(backbone, "global_pool", None) == "token":
            log.warning("I-JEPA's loss never reads the class token, which this ViT's own forward (global_pool=token) "
                        "returns: `pretrain eval` of its export would see it; the configs set class_token=false, "
                        "global_pool=avg, fc_norm=false (method.features average-pools the patch tokens either way)")
        super().__init__(backbone)
        grid = patch_grid(backbone, image_size)
        self.masking = MultiBlockMasking(grid, num_targets, tuple(target_scale), tuple(target_aspect),
                                         tuple(context_scale), (1.0, 1.0), min_keep)
        self.predictor = Predictor(backbone.embed_dim, grid, pred_embed_dim, pred_depth, heads)
        self.predictor.grad_checkpointing = getattr(backbone, "grad_checkpointing", False)
        self.loss_kind = loss
        self.init_momentum_encoder(["backbone"])    # key_backbone: the target encoder
        no_drop_path(self.key_backbone)

    @staticmethod
    def patch_tokens(vit: nn.Module, images: torch.Tensor, keep=None) -> torch.Tensor:
        """[B, 3, S, S] -> the final normed patch tokens [B, N, D] (with keep [B, K]: [B, K, D]), prefix dropped."""
        return vit_tokens(vit, images, keep=keep)[:, vit.num_prefix_tokens:]

    def training_step(self, batch, ctx) -> Dict[str, torch.Tensor]:
        images, masks = batch["views"][0][0], batch["masks"]                 # [B, 3, S, S], [1 + T, B, N]
        T, B = masks.shape[0] - 1, masks.shape[1]
        context_idx = keep_indices(masks[0])                                 # [B, K_c]
        target_idx = keep_indices(masks[1:].flatten(0, 1)).view(T, B, -1)   # [T, B, K_t]
        with torch.no_grad():
            h = self.patch_tokens(self.key_backbone, images).float()         # [B, N, D]
            h = F.layer_norm(h, h.shape[-1:])                                # over the features, no affine (official)
            targets = torch.stack([gather_tokens(h, idx) for idx in target_idx])   # [T, B, K_t, D]
        pred = self.predictor(self.patch_tokens(self.backbone, images, context_idx), context_idx, target_idx)
        loss = prediction_loss(pred, targets, self.loss_kind)
        # the block sizes of this batch (the official log's mask-A / mask-B), on the loss's device
        return {"loss": loss, "context_patches": loss.new_tensor(context_idx.shape[1]),
                "target_patches": loss.new_tensor(target_idx.shape[2])}

    def export_backbone(self, which: str = "default"):
        """The paper evaluates the target encoder: default/target (key) -> the EMA backbone; context (query) -> the
        trained one."""
        if which in ("default", "target", "key"):
            return self.key_backbone
        if which in ("context", "query"):
            return self.backbone
        raise ValueError(f"{type(self).__name__} exports --which target (default) or context, not {which!r}")

    @torch.no_grad()
    def features(self, images: torch.Tensor, which: str = "default") -> torch.Tensor:
        """Average-pooled patch tokens of backbone `which` (the paper's evaluation): [B, 3, H, W] -> [B, D]."""
        return self.patch_tokens(self.export_backbone(which), images).mean(1)


__all__ = ["IJEPA", "Predictor", "prediction_loss"]
