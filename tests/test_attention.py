"""`pretrain attention`: last-layer CLS attention of a ViT per head, and the grid it draws."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import cli, inproc_error_line, train_overrides
from PIL import Image
from safetensors.torch import save_file

from pretrain.evaluation.attention import VIRIDIS, colormap, fit_input_size, heatmaps, last_cls_attention
from pretrain.models import create_backbone

TINY = dict(img_size=32, patch_size=8, depth=2)


def sharp_vit(**kwargs):
    """A random tiny ViT whose last attention is far from uniform (the init's 0.02-std weights give
    near-uniform maps, which a wrong recomputation could still match)."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", {**TINY, **kwargs}).eval()
    with torch.no_grad():
        vit.blocks[-1].attn.qkv.weight.normal_(0, 0.08)
    return vit


def reference_cls_attention(vit, images):
    """Independent path: timm's own unfused attention in float64, its softmax caught at attn_drop."""
    ref = copy.deepcopy(vit).double()
    attn = ref.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        ref.forward_features(images.double())
    hook.remove()
    a = seen[0]                                                        # [B, heads, T, T]
    p = ref.num_prefix_tokens
    g = images.shape[-1] // ref.patch_embed.patch_size[0]
    return a[:, :, 0, p:].reshape(len(images), attn.num_heads, g, g)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4}, {"qk_norm": True}], ids=["cls", "registers", "qk_norm"])
def test_last_cls_attention_matches_timms_unfused_attention_in_float64(kwargs):
    vit = sharp_vit(**kwargs)
    assert vit.blocks[-1].attn.fused_attn                               # the path that returns no weights
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = last_cls_attention(vit, x)
    want = reference_cls_attention(vit, x)
    assert got.shape == (3, 3, 4, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert want.std() > 0.01                                            # not a uniform map
    # the prefix tokens (CLS, registers) take the rest of each row's mass
    assert (got.sum((-2, -1)) < 1).all()


def test_other_image_sizes_resample_the_position_embedding():
    vit = sharp_vit()
    fit_input_size(vit, 48)
    assert last_cls_attention(vit, torch.randn(2, 3, 48, 48)).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="--image-size 44 is not a multiple of the ViT's patch size 8; use e.g. 40"):
        fit_input_size(vit, 44)


def test_models_without_cls_attention_are_refused():
    with pytest.raises(ValueError, match="resnet10t is not a timm ViT.*model.name=vit_"):
        last_cls_attention(create_backbone("resnet10t"), torch.randn(1, 3, 32, 32))
    no_cls = create_backbone("vit_tiny_patch16_224", {**TINY, "class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match="has no class token"):
        last_cls_attention(no_cls, torch.randn(1, 3, 32, 32))


def test_colormap_passes_through_viridis_anchors():
    rgb = lambda h: [int(h[i:i + 2], 16) for i in (1, 3, 5)]  # noqa: E731
    got = colormap(torch.tensor([0.0, 0.5, 1.0, -3.0, 7.0]))
    assert got.dtype == torch.uint8 and got.shape == (5, 3)
    assert got.tolist() == [rgb(VIRIDIS[0]), rgb(VIRIDIS[4]), rgb(VIRIDIS[-1]), rgb(VIRIDIS[0]), rgb(VIRIDIS[-1])]
    lum = (colormap(torch.linspace(0, 1, 256)).double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))
    assert (lum.diff() >= -1).all()                                     # perceptually ordered, dark to bright


def test_heatmap_puts_each_patch_on_its_pixels():
    a = torch.full((1, 2, 4, 4), 0.01)
    a[0, 0, 1, 2] = 0.5                                                 # head 0: one patch
    a[0, 1] = torch.arange(16.0).view(4, 4)                             # head 1: a ramp
    h = heatmaps(a, 32)                                                 # patch = 8 px
    assert h.shape == (1, 2, 3, 32, 32) and h.dtype == torch.uint8
    hot, cold = colormap(torch.tensor(1.0)), colormap(torch.tensor(0.0))
    patch = h[0, 0, :, 8:16, 16:24]
    assert (patch == hot[:, None, None]).all()
    rest = h[0, 0].clone()
    rest[:, 8:16, 16:24] = cold[:, None, None]
    assert (rest == cold[:, None, None]).all()
    assert (h[0, 1, :, :8, :8] == cold[:, None, None]).all() and (h[0, 1, :, 24:, 24:] == hot[:, None, None]).all()


def write_pngs(tmp_path):
    g = np.random.default_rng(0)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(g.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(a)   # not square: resized + cropped
    Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(b)  # grayscale
    return a, b


def test_a_non_vit_backbone_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "resnet.safetensors"
    meta = {"timm_name": "resnet10t", "model_kwargs": {}, "cifar_stem": False, "input_size": [3, 16, 16],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    save_file(create_backbone("resnet10t").state_dict(), str(path), metadata={"pretrain": json.dumps(meta)})
    a, _ = write_pngs(tmp_path)
    line = inproc_error_line(capsys, "attention", path, "--images", a, "--out", tmp_path / "g.png")
    assert "resnet10t is not a timm ViT" in line and "model.name=vit_*" in line
    assert not (tmp_path / "g.png").exists()


def grid_px(rows, cols, cell):
    """(width, height) of the PNG: cells of cell x cell px, 1 px apart and around (save_grid)."""
    return cols * (cell + 1) + 1, rows * (cell + 1) + 1


@pytest.mark.slow
def test_attention_cli_on_a_trained_vit(tmp_path, digits_shards, experiment, capsys):
    """Train MoCo v3 with a tiny ViT for 2 steps, draw its attention from the run dir, from --step and
    from an exported backbone; the picture has one row per image, 1 + heads (+ mean) columns."""
    run = tmp_path / "run"
    cli("train", experiment, *train_overrides(
        digits_shards, run, method__name="moco_v3", model__name="vit_tiny_patch16_224", model__kwargs__img_size=16,
        model__kwargs__patch_size=4, model__kwargs__depth=2, method__pred_hidden_dim=32, optim__name="adamw",
        train__max_steps=2, train__global_batch_size=16), check=True)
    a, b = write_pngs(tmp_path)
    out = tmp_path / "grid.png"
    p = cli("attention", run, "--images", a, b, "--out", out, "--mean", check=True)
    cell, cols = 16 * 8, 1 + 3 + 1                                      # 16 px x default scale 8; vit_tiny: 3 heads
    size = grid_px(2, cols, cell)
    assert f"{size[0]}x{size[1]} px" in p.stdout and "moco_v3 (default) step 2" in p.stdout
    with Image.open(out) as im:
        assert im.size == size and im.mode == "RGB"
        grid = np.array(im)
    # the first cell is the (nearest-upscaled) input; a head's cell uses only colormap colours
    lut = {tuple(c) for c in colormap(torch.linspace(0, 1, 256)).tolist()}
    head = grid[1:1 + cell, 2 + cell:2 + 2 * cell].reshape(-1, 3)
    assert {tuple(c) for c in head.tolist()} <= lut and len({tuple(c) for c in head.tolist()}) > 1

    from pretrain.cli import main

    assert main(["attention", str(run), "--images", str(a), "--out", str(tmp_path / "k.png"), "--which", "key",
                 "--step", "2", "--scale", "1"]) == 0
    with Image.open(tmp_path / "k.png") as im:
        assert im.size == grid_px(1, 4, 16)
    line = inproc_error_line(capsys, "attention", run, "--images", a, "--out", tmp_path / "x.png", "--step", "7")
    assert "no checkpoint of step 7" in line and "steps there: 2" in line
    assert main(["export", str(run), "--out", str(tmp_path / "bb.safetensors")]) == 0
    assert main(["attention", str(tmp_path / "bb.safetensors"), "--images", str(b), "--out", str(tmp_path / "e.png"),
                 "--image-size", "32", "--scale", "2"]) == 0
    with Image.open(tmp_path / "e.png") as im:
        assert im.size == grid_px(1, 4, 64)
