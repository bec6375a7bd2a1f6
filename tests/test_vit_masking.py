"""Token-level ViT access (pretrain.models.vit) and iBOT / MAE patch masking (pretrain.data.masking):
unmasked tokens are exactly timm's forward_features, masked ones match a float64 embedding built by hand,
and the block masks follow the official iBOT algorithm's statistics."""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy import ndimage
from timm.layers import resample_abs_pos_embed

from pretrain.data.masking import BlockMasking, RandomMasking
from pretrain.models import ModelError, create_backbone
from pretrain.models.vit import is_vit, patch_grid, split_tokens, vit_tokens

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
VARIANTS = {
    "cls": {},
    "reg4": dict(reg_tokens=4),
    "reg4_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "avg_no_cls": dict(class_token=False, global_pool="avg"),
    "dynamic": dict(dynamic_img_size=True),
    "pre_norm": dict(pre_norm=True),
}


def _vit(**kw):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", {**TINY, **kw}).eval()
    with torch.no_grad():   # timm zero-inits cls/reg tokens on some paths: make every prefix token count
        for name in ("cls_token", "reg_token"):
            if getattr(model, name, None) is not None:
                getattr(model, name).normal_()
    return model


def _images(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(model, images, masks, token):
    """float64 tokens built by hand: conv patchify -> replace masked rows -> prefix tokens + pos embed ->
    timm's blocks -> norm."""
    m = model.double()
    pe = m.patch_embed
    x = F.conv2d(images.double(), pe.proj.weight, pe.proj.bias, stride=pe.patch_size)    # [B, D, h, w]
    B, D, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)                                                     # [B, h*w, D]
    x = torch.where(masks.reshape(B, h * w, 1), token.double().reshape(1, 1, D), x)
    prefix = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
    n_pos_prefix = 0 if m.no_embed_class else m.num_prefix_tokens
    pos = m.pos_embed
    if (h, w) != tuple(pe.grid_size):
        pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=pe.grid_size, num_prefix_tokens=n_pos_prefix)
    if m.no_embed_class:
        x = torch.cat(prefix + [x + pos], 1)
    else:
        x = torch.cat(prefix + [x], 1) + pos
    x = m.norm_pre(x)
    for blk in m.blocks:
        x = blk(x)
    return m.norm(x)


# ---------------------------------------------------------------------------------------------- vit
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unmasked_tokens_are_forward_features(variant):
    model = _vit(**VARIANTS[variant])
    sizes = (32, 48) if variant == "dynamic" else (32,)
    for size in sizes:
        x = _images(size=size)
        with torch.no_grad():
            out = vit_tokens(model, x)
            h, w = patch_grid(model, size)
            assert out.shape == (3, model.num_prefix_tokens + h * w, 32)
            assert torch.equal(out, model.forward_features(x))
            none = torch.zeros(3, h * w, dtype=torch.bool)
            assert torch.equal(vit_tokens(model, x, none, torch.randn(32)), out)   # all-False mask == no mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_masked_tokens_match_a_float64_reference(variant):
    model = _vit(**VARIANTS[variant])
    size = 48 if variant == "dynamic" else 32
    h, w = patch_grid(model, size)
    x = _images(size=size)
    masks = torch.rand(3, h * w, generator=torch.Generator().manual_seed(2)) < 0.4
    masks[0] = False                               # one image unmasked
    token = torch.nn.Parameter(torch.randn(32))
    with torch.no_grad():
        plain = vit_tokens(model, x)
        out = vit_tokens(model, x, masks.reshape(3, h, w), token)          # [B, h, w] masks work too
        assert torch.equal(out, vit_tokens(model, x, masks, token))
        ref = _reference(model, x, masks, token)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out64 = vit_tokens(model, x.double(), masks, token.double())
    assert torch.allclose(out64, ref, atol=1e-12, rtol=1e-10)
    P = model.num_prefix_tokens
    assert torch.equal(out[0], plain[0])                              # the unmasked image is untouched
    changed = (out[1:, P:] - plain[1:, P:]).abs().amax(-1) > 1e-6     # every patch of a masked image changes
    assert changed.all()                                              # (attention mixes the mask token in)


def test_mask_token_gets_gradient_and_bf16_autocast():
    model = _vit()
    token = torch.nn.Parameter(torch.zeros(1, 1, 32))
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :5] = True
    vit_tokens(model, _images(2), masks, token).square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit_tokens(model, _images(2), masks, token)
    with torch.no_grad():
        assert torch.allclose(out.float(), vit_tokens(model, _images(2), masks, token), atol=0.1)


def test_split_tokens():
    model = _vit(reg_tokens=4)
    tokens = torch.arange(2 * 21 * 3.0).reshape(2, 21, 3)        # 1 cls + 4 reg + 16 patches
    cls, patches = split_tokens(model, tokens)
    assert torch.equal(cls, tokens[:, 0]) and torch.equal(patches, tokens[:, 5:])
    cls, patches = split_tokens(_vit(), vit_tokens(_vit(), _images(2)))
    assert cls.shape == (2, 32) and patches.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="class_token=true.*global_pool=token"):
        split_tokens(_vit(class_token=False, global_pool="avg"), tokens)


def test_patch_grid_and_errors():
    assert is_vit(_vit()) and not is_vit(create_backbone("resnet10t"))
    assert patch_grid(_vit(), 32) == (4, 4)
    assert patch_grid(_vit(dynamic_img_size=True), (48, 64)) == (6, 8)
    assert patch_grid(_vit(dynamic_img_size=True, dynamic_img_pad=True), 36) == (5, 5)
    with pytest.raises(ModelError, match="img_size=48"):
        patch_grid(_vit(), 48)
    with pytest.raises(ValueError, match="needs a timm Vision Transformer.*set model.name"):
        vit_tokens(create_backbone("resnet10t"), _images(1))
    model, x = _vit(), _images(2)
    with pytest.raises(ValueError, match="no mask_token"):
        vit_tokens(model, x, torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid=patch_grid"):
        vit_tokens(model, x, torch.zeros(2, 9, dtype=torch.bool), torch.zeros(32))
    with pytest.raises(ValueError, match="embed_dim is 32"):
        vit_tokens(model, x, torch.zeros(2, 16, dtype=torch.bool), torch.zeros(8))
    drop = _vit(patch_drop_rate=0.5).train()
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        vit_tokens(drop, x, torch.zeros(2, 16, dtype=torch.bool), torch.zeros(32))
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, num_classes=0)
    with pytest.raises(ValueError, match="not a plain timm VisionTransformer"):
        vit_tokens(eva, torch.randn(1, 3, 28, 28))


# ------------------------------------------------------------------------------------------ masking
def _official_ibot_mask(H, W, rng):
    """bytedance/ibot loader.py ImageFolderMask.__getitem__ with its README's --pred_ratio 0 0.3
    --pred_ratio_var 0 0.2 and pred_shape 'block', transcribed (Python's random)."""
    pred_ratio = rng.choice([0, rng.uniform(0.3 - 0.2, 0.3 + 0.2)])
    high = pred_ratio * H * W
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _ in range(10):
            low = (min(H, W) // 3) ** 2
            target_area = rng.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask


def _mask_stats(masks, H, W):
    """masks [n, H*W] -> fraction masked images, and over them: mean/std masked fraction, connected
    components per mask, mean fill of a component's bounding box."""
    masks = masks.reshape(len(masks), H, W)
    n = masks.sum((1, 2))
    frac = n[n > 0] / (H * W)
    comps, fill = [], []
    for m in masks[n > 0]:
        lab, k = ndimage.label(m)
        comps.append(k)
        fill += [m[sl].mean() for sl in ndimage.find_objects(lab)]
    return dict(p=(n > 0).mean(), mean=frac.mean(), std=frac.std(), comps=np.mean(comps), fill=np.mean(fill))


@pytest.mark.parametrize("grid", [14, 4])
def test_block_masking_matches_the_official_ibot_statistics(grid):
    ours = BlockMasking(grid)(1500, torch.Generator().manual_seed(0))               # [2, 1500, grid**2]
    rng = random.Random(0)
    ref = np.stack([_official_ibot_mask(grid, grid, rng).ravel() for _ in range(3000)])
    a, b = _mask_stats(ours.reshape(3000, -1).numpy(), grid, grid), _mask_stats(ref, grid, grid)
    assert abs(a["p"] - 0.5) < 0.03 and abs(b["p"] - 0.5) < 0.03
    assert abs(a["mean"] - b["mean"]) < 0.01 and abs(a["std"] - b["std"]) < 0.01
    assert abs(a["comps"] / b["comps"] - 1) < 0.05 and abs(a["fill"] - b["fill"]) < 0.02
    counts = ours.sum(-1)
    assert counts.max() <= 0.5 * grid * grid                        # never over the largest target
    for v in range(2):                                              # each view masked about half the time, independently
        assert abs((counts[v] > 0).float().mean() - 0.5) < 0.04
    assert abs(((counts[0] > 0) & (counts[1] > 0)).float().mean() - 0.25) < 0.04


def test_block_masking_options():
    g = torch.Generator().manual_seed(0)
    full = BlockMasking((6, 8), num_views=1, ratio=0.25, prob=1.0, min_patches=4)(200, g)
    assert full.shape == (1, 200, 48)
    n = full.sum(-1)
    assert (n > 0).all() and (n <= 12).all() and n.float().mean() > 10    # target 12, reached or nearly
    assert not BlockMasking(6, prob=0.0)(50, g).any()
    uncapped, capped = (_mask_stats(BlockMasking(14, ratio=0.4, prob=1.0, min_patches=4, max_patches=cap)(200, g)
                                    .reshape(400, -1).numpy(), 14, 14) for cap in (None, 6))
    assert capped["comps"] > 1.8 * uncapped["comps"]               # blocks of <= 6 patches: more pieces (4.7 vs 2.2)
    assert abs(capped["mean"] - 0.4) < 0.01 and abs(uncapped["mean"] - 0.4) < 0.01
    for bad, match in [(dict(ratio=(0.5, 0.1)), "ratio"), (dict(prob=2), "prob"), (dict(min_aspect=0), "aspect"),
                       (dict(max_patches=6), "max_patches=6 is below min_patches=16")]:
        with pytest.raises(ValueError, match=match):
            BlockMasking(14, **bad)
    with pytest.raises(ValueError, match="patch_grid"):
        BlockMasking((0, 4))


@pytest.mark.parametrize("masking", [BlockMasking((5, 7), num_views=3), RandomMasking((5, 7), num_views=3, ratio=0.6)])
def test_maskings_are_deterministic_picklable_and_leave_global_rngs_alone(masking):
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a = masking(16, torch.Generator().manual_seed(7))
    assert a.shape == (3, 16, 35) and a.dtype == torch.bool
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    clone = pickle.loads(pickle.dumps(masking))
    assert repr(clone) == repr(masking)
    assert torch.equal(clone(16, torch.Generator().manual_seed(7)), a)
    assert not torch.equal(masking(16, torch.Generator().manual_seed(8)), a)
    g = torch.Generator().manual_seed(7)
    masking(16, g)
    assert not torch.equal(masking(16, g), a)                     # the generator advances


def test_random_masking_exact_count_and_uniform():
    m = RandomMasking((4, 4), num_views=2, ratio=0.3)
    assert m.num_masked == 16 - int(16 * 0.7) == 5
    masks = m(4000, torch.Generator().manual_seed(0))
    assert (masks.sum(-1) == 5).all()
    freq = masks.float().mean((0, 1))                             # each patch masked 5/16 of the time
    assert (freq - 5 / 16).abs().max() < 0.02
    assert RandomMasking(14, ratio=0.75).num_masked == 147        # MAE at 224 px: 49 of 196 kept
    assert not RandomMasking(4, ratio=0.0)(3, torch.Generator()).any()
    with pytest.raises(ValueError, match="ratio"):
        RandomMasking(4, ratio=1.0)


def test_keep_gather_restore_is_a_true_permutation():
    """MAE's shuffle/restore: visible and masked index sets are disjoint and cover every patch, the exact count
    is kept, and restore(gather(x)) puts each visible token back at its own position (the rest: the fill)."""
    from pretrain.data.masking import RandomMasking
    from pretrain.models.vit import gather_tokens, keep_indices, restore_tokens

    masks = RandomMasking((4, 5), 1, 0.75)(6, torch.Generator().manual_seed(3))[0]      # [6, 20]
    keep = keep_indices(masks)
    assert keep.shape == (6, 20 - 15)
    for row, k in zip(masks, keep):
        masked = row.nonzero().flatten()
        assert sorted(k.tolist() + masked.tolist()) == list(range(20))              # disjoint and complete
        assert not row[k].any()
    x = torch.randn(6, 20, 3, dtype=torch.float64)
    fill = torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64)
    back = restore_tokens(gather_tokens(x, keep), keep, 20, fill)
    for b in range(6):
        for n in range(20):
            torch.testing.assert_close(back[b, n], fill if masks[b, n] else x[b, n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="same number"):
        keep_indices(torch.tensor([[True, False], [True, True]]))


def test_vit_tokens_with_keep_runs_only_the_kept_patches():
    """keep: the encoder sees exactly the kept patches (each with its own position embedding): equal to running
    timm's blocks by hand on the gathered tokens; masked patches get no gradient at the pixels."""
    from pretrain.models.vit import keep_indices

    torch.manual_seed(0)
    vit = _vit()
    vit.eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)   # 4 x 4 patches of 8 px
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 6, 15]] = True
    masks[1, [1, 2, 3, 4]] = True
    keep = keep_indices(masks)
    out = vit_tokens(vit, x, keep=keep)
    assert out.shape == (2, vit.num_prefix_tokens + 12, vit.embed_dim)
    with torch.no_grad():                                   # independent route: timm's pieces, tokens picked by hand
        t = vit._pos_embed(vit.patch_embed(x))
        P = vit.num_prefix_tokens
        ref = torch.stack([torch.cat([t[b, :P], t[b, P:][~masks[b]]]) for b in range(2)])
        ref = vit.norm(vit.blocks(vit.norm_pre(ref)))
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    g = x.grad.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1).abs().sum(-1)  # [B, patches]
    assert (g[masks] == 0).all() and (g[~masks] > 0).all()
