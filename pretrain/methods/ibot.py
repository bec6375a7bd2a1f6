"""iBOT (Zhou et al. 2022): DINO's self-distillation on the class token plus masked image modeling with an
online tokenizer -- the student sees its global crops with blockwise-masked patches replaced by a learnable
mask token, and predicts the teacher's (unmasked) patch distributions at the masked positions.

On top of DINO (dino.py), per step, with masks m [2, B, N] of the global crops (drawn in the data pipeline,
`self.masking` = pretrain/data/masking.py BlockMasking, so they split across ranks with the images):

    tokens_s = vit(global crop with masked patches -> mask token)     [2B, 1+N, D]  (pretrain/models/vit.py)
    tokens_t = key_vit(global crop)                                     [2B, 1+N, D]  teacher, no gradient
    loss = lambda1 * DINO loss on the class tokens (+ local crops' class tokens)
         + lambda2 * mean_v mean_b (sum over masked patches n of -p_t[v,b,n] . log softmax(s[v,b,n] / tau_s)) / |m_vb|
    the patch targets centred with a centre of their own (center_patch), at teacher_patch_temp

The head is shared between class and patch tokens (`patch_head: shared`, iBOT's ViT-S recipe) or a second
DINOHead (`separate`, DINOv2). The backbone must be a timm ViT with a class token.

Checked against bytedance/ibot (main_ibot.py iBOTLoss, loader.py ImageFolderMask, models/head.py); deviations
in docs/methods.md (iBOT).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from pretrain.data.masking import BlockMasking
from pretrain.losses.dino import dino_loss, ibot_patch_loss
from pretrain.methods.dino import DINO, dino_views, no_drop_path
from pretrain.methods.registry import METHODS
from pretrain.models import DINOHead
from pretrain.models.vit import is_vit, patch_grid, split_tokens, vit_tokens
from pretrain.params import choice, fraction, non_negative, pair, positive


@METHODS.register("ibot")
class IBOT(DINO):
    views = dino_views((0.25, 1.0), (0.05, 0.25), 10, 96)   # the README's ViT-S recipe: 2 x 224 + 10 x 96
    defaults = {
        **DINO.defaults,
        "out_dim": 8192,
        "norm_last_layer": False,
        "num_local_crops": 10,
        "global_crop_scale": [0.25, 1.0],
        "local_crop_scale": [0.05, 0.25],
        "patch_head": "shared",          # shared (iBOT ViT-S/B recipe) | separate (DINOv2: a second DINOHead)
        "patch_out_dim": 8192,           # the separate patch head's prototypes
        "teacher_patch_temp": {"shape": "linear", "start": 0.04, "end": 0.07, "epochs": 30},
        "cls_weight": 1.0,               # lambda1
        "patch_weight": 1.0,             # lambda2
        "mask_ratio": [0.1, 0.5],        # --pred_ratio 0.3 --pred_ratio_var 0.2: U(0.1, 0.5) per masked image
        "mask_prob": 0.5,                # the fraction of (image, global crop) pairs that are masked at all
    }
    checks = {**DINO.checks, "patch_head": choice("shared", "separate"), "patch_out_dim": DINO.checks["out_dim"],
              "teacher_patch_temp": positive(), "cls_weight": non_negative(), "patch_weight": non_negative(),
              "mask_ratio": pair(0, 1), "mask_prob": fraction()}
    scheduled = DINO.scheduled + ("teacher_patch_temp",)
    requires_vit = True

    def __init__(self, backbone: nn.Module, image_size: int = 224, patch_head="shared", patch_out_dim=8192,
                 cls_weight=1.0, patch_weight=1.0, mask_ratio=(0.1, 0.5), mask_prob=0.5, **dino_kwargs):
        if not is_vit(backbone) or getattr(backbone, "cls_token", None) is None:
            raise ValueError(f"method.name=ibot masks patch tokens, which needs a timm ViT with a class token, not "
                             f"{type(backbone).__name__}; set model.name=vit_* (model.kwargs.class_token=true)")
        super().__init__(backbone, **dino_kwargs)
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))          # iBOT's masked_embed
        h, w = patch_grid(backbone, image_size)
        self.masking = BlockMasking((h, w), num_views=2, ratio=tuple(mask_ratio), prob=mask_prob)
        self.separate = patch_head == "separate"
        if self.separate:   # the same shape as the class-token head, its own prototypes; EMA'd with the rest
            head = self.head
            self.patch_head = DINOHead(backbone.num_features, patch_out_dim, head.mlp[0].out_features,
                                       head.last_layer.weight_v.shape[1], sum(isinstance(m, nn.Linear) for m in head.mlp),
                                       not head.last_layer.weight_g.requires_grad)
            self.init_momentum_encoder(["backbone", "head", "patch_head"])
            no_drop_path(self.key_backbone)
        self.center_patch = None

    def patch_heads(self):
        """(student, teacher) heads of the patch tokens: the class token's, or the separate pair."""
        return (self.patch_head, self.key_patch_head) if self.separate else (self.head, self.key_head)

    def last_layers(self):
        return [self.head, self.patch_head] if self.separate else [self.head]

    def _tokens(self, vit, crops, masks=None, mask_token=None):
        """Global crops [2, B, 3, S, S] -> class tokens [2B, D] and patch tokens [2B, N, D]."""
        flat = masks.flatten(0, 1) if masks is not None else None
        return split_tokens(vit, vit_tokens(vit, crops.flatten(0, 1), flat, mask_token))

    def training_step(self, batch, ctx) -> Dict[str, torch.Tensor]:
        groups, masks = batch["views"], batch["masks"]      # masks [2, B, N] bool, for the global crops
        G, B = groups[0].shape[:2]
        cls_g, patches = self._tokens(self.backbone, groups[0], masks, self.mask_token)   # [2B, D], [2B, N, D]
        cls_l = [self.backbone(g.flatten(0, 1)) for g in groups[1:]]                      # local crops: unmasked
        s_cls = self.head(torch.cat([cls_g, *cls_l])).view(-1, B, self.head.last_layer.weight_v.shape[0])
        N, (patch_head, key_patch_head) = patches.shape[1], self.patch_heads()
        s_patch = patch_head(patches.flatten(0, 1)).view(G, B, N, -1)                    # [2, B, N, K_p]
        with torch.no_grad():
            t_cls, t_patches = self._tokens(self.key_backbone, groups[0])
            t_cls = self.key_head(t_cls).view(G, B, -1)                                  # [2, B, K]
            t_patch = key_patch_head(t_patches.flatten(0, 1)).view(G, B, N, -1)          # [2, B, N, K_p]
        p_cls = self.targets(t_cls, ctx["teacher_temp"])
        p_patch = self.targets(t_patch, ctx["teacher_patch_temp"], "center_patch")
        out = {"cls_loss": dino_loss(s_cls, p_cls, self.student_temp),
               "patch_loss": ibot_patch_loss(s_patch, p_patch, masks.view(G, B, N), self.student_temp)}
        loss = self.cls_weight * out["cls_loss"] + self.patch_weight * out["patch_loss"]
        if self.koleo_weight > 0:
            out["koleo"] = self.koleo(cls_g, G, B)
            loss = loss + self.koleo_weight * out["koleo"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


__all__ = ["IBOT"]
