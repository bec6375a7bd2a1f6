"""MAE (He et al. 2022): masked autoencoders. A timm ViT encoder sees only the visible 25% of an image's
patches; a light transformer decoder gets the encoded tokens back in place, a shared mask token at every
masked position, and predicts the pixels of the masked patches.

Per step, for B images x [B, 3, H, W] and masks m [B, N] (True = masked, exactly N - int(N (1 - mask_ratio))
per image; `self.masking` = RandomMasking, drawn in the data pipeline so they split across ranks and a resume
draws the same ones):

    keep = keep_indices(m)                                  [B, K]     visible patches
    z = vit_tokens(backbone, x, keep=keep)                  [B, P + K, D]  P prefix (class, register) tokens
    y = decoder_embed(z); patches = restore_tokens(y[:, P:], keep, N, mask_token) + decoder_pos_embed
    pred = decoder_pred(decoder_norm(decoder_blocks([y[:, :P], patches])))[:, P:]   [B, N, p*p*3]
    t = patchify(x) [B, N, p*p*3]; norm_pix_loss: t = (t - mean(t)) / sqrt(var(t) + 1e-6) per patch
    loss = sum_{b,n} m[b,n] mean_j (pred - t)[b,n,j]^2 / sum m

The encoder is the timm model itself (export gives it alone); with `encoder_init: mae` its position
embedding is overwritten with MAE's fixed 2-D sin-cos table and frozen, and its weights re-initialised as
models_mae.py does. Checked against facebookresearch/mae (models_mae.py, main_pretrain.py,
util/pos_embed.py); deviations in docs/methods.md (MAE).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from pretrain.data.masking import RandomMasking
from pretrain.data.views import ViewSpec
from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.models.backbone import run_blocks
from pretrain.models.vit import (is_vit, keep_indices, patch_grid, patchify, restore_tokens, sincos_pos_embed_2d,  # noqa: F401
                                 unpatchify, vit_tokens, xavier_linears)
from pretrain.params import boolean, choice, fraction, integer, positive

#: main_pretrain.py: RandomResizedCrop(scale=(0.2, 1.0), bicubic) and a horizontal flip; nothing else
MAE_VIEW = ViewSpec(crop_scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
NORM_PIX_EPS = 1e-6


def pixel_targets(patches: torch.Tensor, norm_pix: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches [B, N, J] -> (targets, mean, std), in float32 at least: with norm_pix each patch standardised by its
    own mean and unbiased variance (torch.var, as models_mae.py) + 1e-6; otherwise the pixels (mean 0, std 1)."""
    t = patches.to(torch.promote_types(patches.dtype, torch.float32))
    if not norm_pix:
        return t, torch.zeros_like(t[..., :1]), torch.ones_like(t[..., :1])
    mean, std = t.mean(-1, keepdim=True), (t.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()   # [B, N, 1]
    return (t - mean) / std, mean, std


def mae_loss(pred: torch.Tensor, patches: torch.Tensor, masks: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss in float32 (at least): pred, patches [B, N, J] (patchified images), masks bool [B, N] (True =
    masked) -> the mean over masked patches of the per-patch mean squared error."""
    target = pixel_targets(patches, norm_pix)[0]
    per_patch = (pred.to(target.dtype) - target).pow(2).mean(-1)                      # [B, N]
    m = masks.to(per_patch.device, per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def mae_init_encoder(vit: nn.Module) -> None:
    """models_mae.py initialize_weights on a timm ViT: the fixed sin-cos position embedding (zeros at the prefix
    tokens' rows, frozen), the patch projection xavier_uniform as a Linear, class/register tokens N(0, 0.02),
    xavier_uniform Linear layers."""
    xavier_linears(vit)
    w = vit.patch_embed.proj.weight
    with torch.no_grad():
        w.copy_(nn.init.xavier_uniform_(torch.empty(w.shape[0], w[0].numel())).view_as(w))
        for name in ("cls_token", "reg_token"):
            if getattr(vit, name, None) is not None:
                nn.init.normal_(getattr(vit, name), std=0.02)
        pe = getattr(vit, "pos_embed", None)
        if pe is not None:
            table = sincos_pos_embed_2d(pe.shape[-1], vit.patch_embed.grid_size)      # [N, D]
            prefix = pe.shape[1] - table.shape[0]                                   # 0 with no_embed_class
            pe.copy_(torch.cat([table.new_zeros(prefix, table.shape[1]), table]).unsqueeze(0))
            pe.requires_grad_(False)


@METHODS.register("mae")
class MAE(Method):
    views = (MAE_VIEW,)
    defaults = {
        "mask_ratio": 0.75,
        "norm_pix_loss": True,     # the paper's best recipe (PRETRAIN.md --norm_pix_loss); false: raw pixels
        "decoder_dim": 512,
        "decoder_depth": 8,
        "decoder_heads": 16,
        "decoder_mlp_ratio": 4.0,
        "encoder_init": "mae",     # mae: models_mae.py's init + fixed sin-cos pos_embed | keep: the backbone as built
                                   # (timm's init, or a model.pretrained_file warm start)
    }
    checks = {"mask_ratio": fraction(0, 1, lo_open=True, hi_open=True), "norm_pix_loss": boolean(),
              "decoder_dim": integer(1), "decoder_depth": integer(1), "decoder_heads": integer(1),
              "decoder_mlp_ratio": positive(), "encoder_init": choice("mae", "keep")}
    requires_vit = True
    #: a per-patch loss averaged over the same number of masked patches on every rank, no BatchNorm: the mean of
    #: the ranks' losses is the big batch's (tests/test_rank_equivalence.py)
    cross_rank_exact = True

    def __init__(self, backbone: nn.Module, image_size: int = 224, mask_ratio=0.75, norm_pix_loss=True,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16, decoder_mlp_ratio=4.0, encoder_init="mae"):
        if not is_vit(backbone):
            raise ValueError(f"method.name=mae encodes visible patch tokens, which needs a timm ViT, not "
                             f"{type(backbone).__name__}; set model.name=vit_* (e.g. vit_base_patch16_224)")
        if decoder_dim % decoder_heads:
            raise ValueError(f"method.decoder_heads={decoder_heads} does not divide method.decoder_dim={decoder_dim}; "
                             f"pick heads that divide it (MAE: 16 heads of 32 at 512)")
        super().__init__(backbone)
        self.grid = patch_grid(backbone, image_size)
        self.patch = tuple(backbone.patch_embed.patch_size)
        self.masking = RandomMasking(self.grid, 1, mask_ratio)
        if self.masking.num_patches == self.masking.num_masked:
            raise ValueError(f"method.mask_ratio={mask_ratio} masks all {self.masking.num_patches} patches of the "
                             f"{self.grid[0]}x{self.grid[1]} grid; lower it below {1 - 1 / self.masking.num_patches:.3f}")
        self.norm_pix_loss = norm_pix_loss
        warm = getattr(backbone, "pretrain_spec", {}).get("pretrained_file")
        if encoder_init == "mae" and warm:   # decided by the config, so that a resume builds the same parameters
            raise ValueError(f"method.encoder_init=mae would re-initialise the encoder that model.pretrained_file={warm} "
                             f"loaded; set method.encoder_init=keep to continue pretraining from those weights")
        if encoder_init == "mae":
            mae_init_encoder(backbone)
        # the pooling head is not part of MAE's encoder; frozen, so DDP finds no parameter without a gradient
        for name in ("fc_norm", "attn_pool", "head"):
            if isinstance(getattr(backbone, name, None), nn.Module):
                getattr(backbone, name).requires_grad_(False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, decoder_mlp_ratio, qkv_bias=True,
                                                    norm_layer=norm) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch[0] * self.patch[1] * 3)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            xavier_linears(m)
        nn.init.normal_(self.mask_token, std=0.02)
        # fixed, a function of the grid: a buffer outside the checkpoint
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, self.grid).unsqueeze(0),
                             persistent=False)                                          # [1, N, Dd]

    def predict(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] and masks bool [B, N] (True = masked) -> predicted patches [B, N, p*p*3] (the
        normalised targets with norm_pix_loss); the encoder sees the visible patches only."""
        keep = keep_indices(masks).to(images.device)                                   # [B, K]
        tokens = self.decoder_embed(vit_tokens(self.backbone, images, keep=keep))       # [B, P + K, Dd]
        P, N = tokens.shape[1] - keep.shape[1], masks.shape[1]
        patches = restore_tokens(tokens[:, P:], keep, N, self.mask_token)              # [B, N, Dd]
        x = torch.cat([tokens[:, :P], patches + self.decoder_pos_embed.to(patches.dtype)], 1)
        x = run_blocks(self.decoder_blocks, x, getattr(self.backbone, "grad_checkpointing", False))
        return self.decoder_pred(self.decoder_norm(x)[:, P:])                          # [B, N, p*p*3]

    def training_step(self, batch, ctx) -> Dict[str, torch.Tensor]:
        images, masks = batch["views"][0][0], batch["masks"][0]                        # [B, 3, H, W], [B, N]
        pred = self.predict(images, masks)
        # the target carries no gradient: the masked patches' pixels reach the loss only as targets
        return {"loss": mae_loss(pred, patchify(images.detach(), self.patch), masks, self.norm_pix_loss)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The predicted images [B, 3, H, W] in the input's (normalised) pixel space: with norm_pix_loss each
        predicted patch is mapped back with the mean and std of the true patch (as visualisations of norm-pix
        MAEs do; the pixel-loss model needs no such help)."""
        _, mean, std = pixel_targets(patchify(images, self.patch), self.norm_pix_loss)
        return unpatchify(self.predict(images, masks).to(std.dtype) * std + mean, self.grid, self.patch)


__all__ = ["MAE", "mae_loss", "patchify", "unpatchify", "sincos_pos_embed_2d", "mae_init_encoder"]
