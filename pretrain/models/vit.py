"""Token-level access to timm Vision Transformers, for masked-image methods (iBOT, MAE, I-JEPA).

`vit_tokens` runs timm's own stages of `VisionTransformer.forward_features` (patch_embed, _pos_embed,
patch_drop, norm_pre, blocks, norm) and, between the patch embedding and the position embedding,
replaces the embeddings of masked patches by a learned mask token (BEiT / iBOT:
x = x * (1 - m) + mask_token * m). With no mask it returns exactly what `forward_features` returns, for
any `VisionTransformer` (class token or not, register tokens, `no_embed_class`, `dynamic_img_size`).

Under DeepSpeed ZeRO-3 the model's own parameters (cls_token, pos_embed, reg_token) are read here
outside the model's forward; DeepSpeed's engine forward gathers such "external" parameters on access.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchDropout, build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from pretrain.models.backbone import ModelError


def is_vit(model: nn.Module) -> bool:
    """True for a timm VisionTransformer (or a model with its stages: patch_embed, blocks, _pos_embed, norm)."""
    return isinstance(model, VisionTransformer) or all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "norm"))


def _name(model: nn.Module) -> str:
    return getattr(model, "pretrain_spec", {}).get("name") or type(model).__name__


def _check_vit(model: nn.Module) -> None:
    if not is_vit(model):
        raise ValueError(f"token-level access needs a timm Vision Transformer, got '{_name(model)}' ({type(model).__name__}); "
                         f"set model.name to a ViT such as vit_small_patch16_224")


def patch_grid(model: nn.Module, image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(h, w): the patch grid `model` makes of `image_size` (an int side or (H, W)) px images, i.e. the
    masks' layout; with dynamic_img_size any size works (dynamic_img_pad: partial patches count)."""
    _check_vit(model)
    pe = model.patch_embed
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if getattr(pe, "strict_img_size", False) and pe.img_size is not None and tuple(pe.img_size) != (H, W):
        raise ModelError(f"'{_name(model)}' is built for {tuple(pe.img_size)} px inputs, not {(H, W)}; "
                         f"set model.kwargs.img_size={H if H == W else [H, W]} (or model.kwargs.dynamic_img_size=true)")
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size((H, W)))
    ph, pw = pe.patch_size
    return H // ph, W // pw


def _mask_embeddings(x: torch.Tensor, masks: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] or [B, h, w, D] (NHWC) patch embeddings; masks [B, N] or [B, h, w]; mask_token [D] or
    [1, 1, D] -> x with the masked patches' rows replaced by the mask token (its gradient flows)."""
    B, D = x.shape[0], x.shape[-1]
    if mask_token is None:
        raise ValueError("vit_tokens got masks but no mask_token; pass mask_token=an nn.Parameter of shape [embed_dim]")
    if masks.shape[0] != B or masks[0].numel() != x.shape[1:-1].numel():
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit {B} images of {x.shape[1:-1].numel()} patches; "
                         f"build the masking with grid=patch_grid(model, image_size) for these images")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token has {mask_token.numel()} elements, the ViT's embed_dim is {D}; make it shape [{D}]")
    m = masks.to(device=x.device, dtype=torch.bool, non_blocking=True).reshape(x.shape[:-1]).unsqueeze(-1)  # [B, ..., 1]
    return torch.where(m, mask_token.reshape(D).to(x.dtype), x)


def keep_indices(masks: torch.Tensor) -> torch.Tensor:
    """masks bool [B, N] (True = masked) with the same number of False in every row -> the visible patches'
    indices, Long [B, K] ascending (MAE's ids_keep, up to order: a transformer after the position embedding
    does not see token order). A batch whose rows keep different counts cannot stack: that is an error."""
    counts = (~masks).sum(-1)                                     # [B]
    if masks.ndim != 2 or (counts != counts[:1]).any():
        raise ValueError(f"keep_indices needs bool masks [B, N] that keep the same number of patches in every row, "
                         f"got shape {tuple(masks.shape)} keeping {sorted(set(counts.flatten().tolist()))}; draw them "
                         f"with a fixed-count masking (RandomMasking)")
    return (~masks).nonzero()[:, 1].reshape(masks.shape[0], -1)   # row-major nonzero: rows in order, ascending


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index Long [B, K] -> [B, K, D]: row b holds x[b, index[b]] (the gradient flows to those only)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x: torch.Tensor, index: torch.Tensor, num_patches: int, fill: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_tokens` (MAE's unshuffle with ids_restore): x [B, K, D] placed at positions
    index [B, K] of a [B, num_patches, D] sequence whose other positions hold `fill` [D] (the mask token)."""
    B, K, D = x.shape
    out = fill.reshape(1, 1, D).to(x.dtype).expand(B, num_patches, D)
    return out.scatter(1, index.unsqueeze(-1).expand(-1, -1, D), x)


def vit_tokens(model: nn.Module, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The final normed tokens of a timm ViT, as `model.forward_features(images)`, with masked patches'
    embeddings replaced by `mask_token` before the position embedding.

    Args:
        model: a timm VisionTransformer (see `is_vit`).
        images: [B, 3, H, W].
        masks: None, or bool [B, h*w] / [B, h, w] over the patch grid (`patch_grid(model, H)`), row-major;
            True = masked. An all-False mask gives exactly the unmasked result.
        mask_token: [D] or [1, 1, D] (an nn.Parameter of the method), required with masks.
        keep: None, or Long [B, K] patch indices (`keep_indices`): only these patches enter the blocks, after
            the position embedding (MAE's encoder, I-JEPA's context encoder); the dropped ones get no gradient.
    Returns:
        [B, P + h*w, D] (with keep: [B, P + K, D]): P = model.num_prefix_tokens prefix tokens (class token
        first, then register tokens), then the patch tokens in row-major order (with keep: in `keep`'s
        order); `split_tokens` separates them.
    """
    _check_vit(model)
    if keep is not None and masks is not None:
        raise ValueError("vit_tokens takes masks (replace patches by the mask token) or keep (drop them), not both")
    x = model.patch_embed(images)                                  # [B, h*w, D], or [B, h, w, D] (dynamic_img_size)
    drop = getattr(model, "patch_drop", None)
    if (masks is not None or keep is not None) and isinstance(drop, PatchDropout) and drop.training and drop.prob > 0:
        raise ValueError(f"'{_name(model)}' drops {drop.prob:.0%} of its patch tokens in training (patch_drop_rate), "
                         f"so its outputs no longer line up with the mask; set model.kwargs.patch_drop_rate=0")
    if masks is not None:
        x = _mask_embeddings(x, masks, mask_token)
    x = model._pos_embed(x)                                        # [B, P + h*w, D]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"'{_name(model)}' ({type(model).__name__}) is not a plain timm VisionTransformer (its _pos_embed "
                         f"returns {type(x).__name__}); use a vit_* / deit* model")
    if keep is not None:
        P = model.num_prefix_tokens
        x = torch.cat([x[:, :P], gather_tokens(x[:, P:], keep.to(x.device))], 1)   # [B, P + K, D]
    for stage in ("patch_drop", "norm_pre"):
        x = getattr(model, stage, nn.Identity())(x)
    if getattr(model, "grad_checkpointing", False) and not torch.jit.is_scripting():
        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    return model.norm(x)


def split_tokens(model: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, P + N, D] from `vit_tokens` -> (cls [B, D], patches [B, N, D]); patches exclude the
    class and register tokens. Needs a class token (timm's class_token=True, global_pool='token')."""
    _check_vit(model)
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"'{_name(model)}' has no class token (class_token=False, global_pool="
                         f"'{getattr(model, 'global_pool', '?')}'); set model.kwargs.class_token=true and "
                         f"model.kwargs.global_pool=token")
    return tokens[:, 0], tokens[:, model.num_prefix_tokens:]


# ---- shared by MAE's decoder and the DiT denoiser (pretrain/models/dit.py) ----------------------------------
def sincos_pos_embed_2d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding (util/pos_embed.py get_2d_sincos_pos_embed, for an (h, w)
    grid) -> float32 [h*w, dim], rows in row-major patch order. Row r*w + c holds [sin(c w_k), cos(c w_k)] in
    its first half and [sin(r w_k), cos(r w_k)] in its second, w_k = 10000^(-k / (dim / 4)), k < dim / 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    # timm's table, sin/cos interleaved per coordinate: [sin r, cos r | sin c, cos c]; MAE puts the column first
    table = build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=True)   # [h*w, dim]
    return table.roll(dim // 2, dims=1)


def patchify(images: torch.Tensor, patch: Tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, h*w, ph*pw*C] (models_mae.py's order: patches row-major, pixels (row, col, channel))."""
    B, C, H, W = images.shape
    ph, pw = patch
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(patches: torch.Tensor, grid: Tuple[int, int], patch: Tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: [B, h*w, ph*pw*C] -> [B, C, h*ph, w*pw]."""
    (h, w), (ph, pw) = grid, patch
    B, C = patches.shape[0], patches.shape[-1] // (ph * pw)
    x = patches.reshape(B, h, w, ph, pw, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * ph, w * pw)


def xavier_linears(module: nn.Module) -> None:
    """models_mae.py _init_weights: xavier_uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
