"""Last-layer CLS attention of a timm ViT, drawn per head as in DINO's visualize_attention.py: one row
per image, the input then one heatmap per head (nearest-upsampled patch grid, each map min-max scaled,
viridis), optionally the mean over heads.

timm's Attention runs fused SDPA and returns no weights, so `last_cls_attention` captures the input of
the last block's attention with a forward pre-hook and recomputes softmax(q k^T * scale) for the CLS
query from the module's own qkv, q_norm/k_norm and scale: timm stays untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: matplotlib's viridis at 0, 1/8, ..., 1; `colormap` interpolates linearly between them
VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
_LUT = None


def colormap(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], any shape [...] -> uint8 RGB [..., 3] through a 256-entry viridis table."""
    global _LUT
    if _LUT is None:
        anchors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in VIRIDIS], dtype=np.float64)  # [9, 3]
        pos, t = np.linspace(0, 1, len(anchors)), np.linspace(0, 1, 256)
        _LUT = torch.from_numpy(np.stack([np.interp(t, pos, anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8))
    return _LUT[(x.clamp(0, 1) * 255).round().long()]


def vit_attention(vit: torch.nn.Module):
    """The last block's timm Attention module of `vit`; ValueError naming the remedy when it has none
    (not a ViT, another attention kind, or no class token)."""
    from timm.layers import Attention

    name = getattr(vit, "pretrain_spec", {}).get("name", type(vit).__name__)
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if not isinstance(attn, Attention) or getattr(vit, "patch_embed", None) is None:
        raise ValueError(f"the backbone {name} is not a timm ViT (its last block has no timm Attention), so it has no "
                         f"CLS attention to draw; use a run trained with a ViT backbone (model.name=vit_*)")
    if getattr(vit, "cls_token", None) is None:
        raise ValueError(f"the ViT {name} has no class token (class_token=False), so it has no CLS attention to draw; "
                         f"use a ViT trained with its class token (timm's default)")
    return attn


def fit_input_size(vit: torch.nn.Module, size: int) -> None:
    """Make a fixed-size ViT take size x size images (timm's set_input_size resamples its position
    embedding, as DINO interpolates it to draw at other resolutions)."""
    pe = vit.patch_embed
    p = pe.patch_size[0]
    if size % p:
        raise ValueError(f"--image-size {size} is not a multiple of the ViT's patch size {p}; use e.g. {max(p, size // p * p)}")
    if getattr(vit, "dynamic_img_size", False) or tuple(pe.img_size) == (size, size):
        return
    vit.set_input_size(img_size=(size, size))


@torch.no_grad()
def last_cls_attention(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the class token to every patch token in the last block, per head.

    images: [B, 3, H, W] normalised -> [B, heads, H / patch, W / patch] (register tokens and the class
    token itself are left out, so a map sums to 1 minus the CLS token's attention to the prefix tokens).
    """
    attn = vit_attention(vit)
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["x"]),
                                          with_kwargs=True)
    try:
        vit.forward_features(images)
    finally:
        hook.remove()
    x = seen["x"]                                                              # [B, T, D] the attention's input
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, h, T, hd]
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])                 # CLS query [B, h, 1, hd], keys [B, h, T, hd]
    scores = (q * attn.scale) @ k.transpose(-2, -1)                            # [B, h, 1, T]
    a = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1)[:, :, 0]  # [B, h, T]
    gh, gw = vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    p = vit.num_prefix_tokens
    if T - p != gh * gw:
        raise ValueError(f"the ViT has {T - p} patch tokens, not the {gh}x{gw} grid of {tuple(images.shape[-2:])} images")
    return a[:, :, p:].reshape(B, attn.num_heads, gh, gw)


def heatmaps(attn: torch.Tensor, cell: int) -> torch.Tensor:
    """[B, h, gh, gw] attention -> uint8 [B, h, 3, cell, cell] viridis images, each map min-max scaled
    (as matplotlib's imsave in DINO) and nearest-upsampled, so each patch stays a visible square."""
    lo = attn.amin((-2, -1), keepdim=True)
    hi = attn.amax((-2, -1), keepdim=True)
    a = (attn - lo) / (hi - lo).clamp_min(1e-12)                               # [B, h, gh, gw] in [0, 1]
    a = F.interpolate(a.float(), size=(cell, cell), mode="nearest")            # [B, h, cell, cell]
    return colormap(a).permute(0, 1, 4, 2, 3)                                  # [B, h, 3, cell, cell]


def load_images(paths: Sequence, size: int) -> torch.Tensor:
    """Image files -> uint8 [N, 3, size, size]: RGB, shorter side resized to `size`, centre-cropped
    (the eval transform, pretrain.data.augment.center_resize)."""
    from PIL import Image

    from pretrain.data.augment import center_resize

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} not found; pass existing image files to --images")
        try:
            with Image.open(p) as im:
                arr = np.array(im.convert("RGB"))                              # [h, w, 3] uint8
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {p} ({e}); pass PNG/JPEG/WebP files to --images") from None
        out.append(center_resize(torch.from_numpy(arr).permute(2, 0, 1), size))
    return torch.stack(out)


def attention_grid(vit: torch.nn.Module, images: torch.Tensor, mean, std, mean_column: bool = False,
                   scale: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """uint8 images [N, 3, S, S] -> (cells uint8 [N, 1 + heads (+1), 3, C, C], columns): the image,
    each head's map, the mean over heads when `mean_column`. C = S * scale; scale defaults to
    max(1, 128 // S), so small images still make a readable picture."""
    from pretrain.data.augment import normalize

    if scale is not None and scale < 1:
        raise ValueError(f"--scale must be an integer >= 1, got {scale}")
    S = images.shape[-1]
    cell = S * (scale or max(1, 128 // S))
    vit.eval()
    param = next(vit.parameters())                                           # the ViT's device and dtype
    attn = last_cls_attention(vit, normalize(images, mean, std).to(param)).float().cpu()   # [N, h, gh, gw]
    if mean_column:
        attn = torch.cat([attn, attn.mean(1, keepdim=True)], 1)
    shown = F.interpolate(images.float(), size=(cell, cell), mode="nearest").round().to(torch.uint8)
    cells = torch.cat([shown[:, None], heatmaps(attn, cell)], 1)             # [N, cols, 3, C, C]
    return cells, cells.shape[1]


def checkpoint_at(run_dir, step: int) -> Path:
    """run_dir's checkpoint of `step`; CheckpointError listing the steps it has otherwise."""
    from pretrain.engine.checkpoint import CheckpointError, list_checkpoints, step_of

    found = list_checkpoints(Path(run_dir) / "checkpoints") or list_checkpoints(Path(run_dir))
    for c in found:
        if step_of(c) == step:
            return c
    have = ", ".join(str(step_of(c)) for c in found) or "none"
    raise CheckpointError(f"no checkpoint of step {step} in {run_dir} (steps there: {have}); "
                          f"pass one of them to --step, or leave it out for the newest")


def load_vit(path, which: str = "default", step: Optional[int] = None):
    """(backbone, image size, mean, std, description) from a run dir or checkpoint (the method rebuilt by
    pretrain.export.load_method, `method.export_backbone(which)`), or from a `pretrain export` .safetensors."""
    from pretrain.export import load_backbone, load_method

    path = Path(path)
    if path.suffix == ".safetensors":
        if step is not None or which != "default":
            raise ValueError(f"--step and --which choose a checkpoint's backbone; {path} is an exported backbone already")
        model, meta = load_backbone(path)
        what = f"{meta.get('method', '?')} backbone {path.name} (step {meta.get('step', '?')})"
        return model, meta["input_size"][-1], meta["mean"], meta["std"], what
    method, cfg, s = load_method(checkpoint_at(path, step) if step is not None else path)
    backbone = method.export_backbone(which)
    size = method.backbone_input_size(cfg.data.image_size)
    return backbone, size, list(cfg.data.mean), list(cfg.data.std), f"{cfg.method.name} ({which}) step {s}"


def draw_attention(path, images: List, out, which: str = "default", step: Optional[int] = None,
                   image_size: Optional[int] = None, mean_column: bool = False, scale: Optional[int] = None) -> dict:
    """`pretrain attention`: write the grid of `attention_grid` for the image files `images` to PNG `out`,
    using the ViT of `path` (run dir, checkpoint or exported .safetensors). Returns a summary."""
    from pretrain.evaluation.generative import save_grid, to_signed

    vit, size, mean, std, what = load_vit(path, which, step)
    vit_attention(vit)                       # a non-ViT fails here, before any image is read
    size = image_size or size
    fit_input_size(vit, size)
    cells, cols = attention_grid(vit, load_images(images, size), mean, std, mean_column, scale)
    grid = save_grid(to_signed(cells.flatten(0, 1)), out, nrow=cols)
    return {"out": str(out), "model": what, "images": len(images), "heads": vit_attention(vit).num_heads,
            "image_size": size, "columns": cols, "pixels": [grid.shape[-1], grid.shape[-2]]}
