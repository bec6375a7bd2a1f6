"""MAE (pretrain/methods/mae.py) and `pretrain reconstruct`: the loss against float64 references written
differently (loops over patches; models_mae.py's shuffle-and-unshuffle forward), masked-only loss, no gradient to
masked pixels, MAE's initialisation and fixed sin-cos tables, the parameter groups, the reference config, an exact
resume (same masks), the export loaded by timm, and the reconstruction grid with its one-line errors."""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import SMALL_VIT, cli, inproc_error_line, tb_scalars, train_overrides
from PIL import Image

from pretrain.config import ConfigError, load_config
from pretrain.engine.checkpoint import find_checkpoint
from pretrain.methods import create_method
from pretrain.methods.mae import MAE_VIEW, mae_loss, patchify, sincos_pos_embed_2d, unpatchify

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_DECODER = ["method.decoder_dim=64", "method.decoder_depth=2", "method.decoder_heads=4"]


def _mae(*extra, seed=0):
    cfg = load_config(None, ["data.train=x", "data.image_size=16", "method.name=mae", *SMALL_VIT, *SMALL_DECODER,
                             *extra])
    torch.manual_seed(seed)
    return create_method(cfg).train()


def _batch(m, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(1, B, 3, 16, 16, generator=g)], "masks": m.masking(B, g)}


# ------------------------------------------------------------------------------------------------ float64 references
def ref_sincos(dim, h, w):
    """util/pos_embed.py get_2d_sincos_pos_embed by its definition, float64, one entry at a time: position r*w + c
    gets sin/cos of the column c * omega_k in its first half, of the row r in its second, omega_k = 10000^(-k/(D/4))."""
    q = dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for k in range(q):
                om = 1.0 / 10000 ** (k / q)
                out[r * w + c, k], out[r * w + c, q + k] = math.sin(c * om), math.cos(c * om)
                out[r * w + c, 2 * q + k], out[r * w + c, 3 * q + k] = math.sin(r * om), math.cos(r * om)
    return out


def ref_loss(pred, images, masks, p, norm_pix):
    """models_mae.py forward_loss by loops over images and patches in float64 (variance with Bessel's n - 1, as
    torch.var): the mean over masked patches of each patch's mean squared error."""
    B, _, H, W = images.shape
    total, count = 0.0, 0
    for b in range(B):
        for n in range(masks.shape[1]):
            if not masks[b, n]:
                continue
            r, c = divmod(n, W // p)
            vals = [float(images[b, ch, r * p + i, c * p + j]) for i in range(p) for j in range(p) for ch in range(3)]
            if norm_pix:
                mu = sum(vals) / len(vals)
                var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
                vals = [(v - mu) / math.sqrt(var + 1e-6) for v in vals]
            total += sum((float(pred[b, n, j]) - v) ** 2 for j, v in enumerate(vals)) / len(vals)
            count += 1
    return total / count


def official_forward(m, images, masks, seed=5):
    """models_mae.py forward_encoder / forward_decoder on the method's own modules, written its way: the position
    embedding added to every patch, a per-sample shuffle (the visible patches first, in a random order), the class
    token appended, blocks; then mask tokens concatenated and unshuffled with ids_restore, the decoder's table with a
    zero row for the class token. -> pred [B, N, p*p*3]."""
    vit, (B, N) = m.backbone, masks.shape
    g = torch.Generator().manual_seed(seed)
    x = vit.patch_embed(images)
    x = x.flatten(1, 2) if x.ndim == 4 else x                                 # dynamic_img_size: NHWC
    x = x + vit.pos_embed[:, 1:]
    ids_shuffle = torch.stack([torch.cat([k[torch.randperm(len(k), generator=g)], d[torch.randperm(len(d), generator=g)]])
                               for k, d in ((row.logical_not().nonzero()[:, 0], row.nonzero()[:, 0]) for row in masks)])
    ids_restore = ids_shuffle.argsort(1)
    K = int((~masks[0]).sum())
    x = torch.gather(x, 1, ids_shuffle[:, :K, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
    for blk in vit.blocks:
        x = blk(x)
    x = m.decoder_embed(vit.norm(x))
    x_ = torch.cat([x[:, 1:], m.mask_token.reshape(1, 1, -1).expand(B, N - K, -1)], 1)
    x_ = torch.gather(x_, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], x_], 1)
    h, w = m.grid
    x = x + torch.cat([torch.zeros(1, x.shape[-1], dtype=x.dtype), ref_sincos(x.shape[-1], h, w).to(x.dtype)])[None]
    for blk in m.decoder_blocks:
        x = blk(x)
    return m.decoder_pred(m.decoder_norm(x))[:, 1:]


@pytest.mark.parametrize("dim,grid", [(8, (3, 5)), (64, (4, 4)), (192, (14, 14))])
def test_sincos_table_is_maes(dim, grid):
    torch.testing.assert_close(sincos_pos_embed_2d(dim, grid).double(), ref_sincos(dim, *grid), rtol=0, atol=2e-6)


def test_patchify_order_and_inverse():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, (4, 4))                                                   # [2, 6, 48]
    assert p.shape == (2, 6, 48)
    # patch 4 = row 1, column 1 of the 2 x 3 grid; pixels in (row, col, channel) order (models_mae.py 'nhwpqc')
    torch.testing.assert_close(p[1, 4], x[1, :, 4:8, 4:8].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(p, (2, 3), (4, 4)), x)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_a_float64_loop_reference(norm_pix):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=g)
    pred = torch.randn(3, 4, 48, generator=g)
    masks = torch.rand(3, 4, generator=g) < 0.6
    masks[0, 0] = True
    got = mae_loss(pred, patchify(images, (4, 4)), masks, norm_pix)
    assert got.item() == pytest.approx(ref_loss(pred, images, masks, 4, norm_pix), rel=1e-5)


def test_norm_pix_targets_ignore_each_patchs_brightness_and_contrast():
    """With norm_pix_loss the target of a patch a*x + b (a > 0) is that of x; the raw pixel loss changes."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 8, 8, generator=g)
    pred, masks = torch.randn(2, 4, 48, generator=g), torch.ones(2, 4, dtype=torch.bool)
    a = torch.rand(2, 4, 1, generator=g) + 0.5
    b = torch.randn(2, 4, 1, generator=g)
    p = patchify(images, (4, 4))
    assert mae_loss(pred, a * p + b, masks, True).item() == pytest.approx(mae_loss(pred, p, masks, True).item(), rel=1e-4)
    assert abs(mae_loss(pred, a * p + b, masks, False).item() - mae_loss(pred, p, masks, False).item()) > 1e-2


def test_method_equals_the_official_forward_in_float64():
    """The method's loss (keep_indices / vit_tokens / restore_tokens) equals models_mae.py's shuffle-and-unshuffle
    forward on the same weights and masks, with the loss by loops; both ways of norm_pix_loss."""
    for norm_pix in (True, False):
        m = _mae(f"method.norm_pix_loss={str(norm_pix).lower()}").double()
        batch = _batch(m)
        images, masks = batch["views"][0][0].double(), batch["masks"][0]
        with torch.no_grad():
            got = m({"views": [images[None]], "masks": batch["masks"]})["loss"].item()
            pred = official_forward(m, images, masks)
        # the method's decoder table is timm's float32 (~1e-7 off the float64 one): 1e-6, where a wrong order is O(1)
        assert got == pytest.approx(ref_loss(pred, images, masks, 4, norm_pix), rel=1e-6)


def test_loss_counts_masked_patches_only():
    """Noise added to the decoder's predictions of visible patches leaves the loss as it was; at a masked one it does not."""
    m = _mae()
    batch = _batch(m)
    visible = ~batch["masks"][0]                                             # [B, N]
    with torch.no_grad():
        want = m(batch)["loss"].item()
        for where, same in ((visible, True), (~visible, False)):
            h = m.decoder_pred.register_forward_hook(lambda mod, i, out: out + 10 * torch.randn_like(out) * where[..., None])
            got = m(batch)["loss"].item()
            h.remove()
            assert (got == pytest.approx(want, rel=1e-6)) is same, (got, want)


def test_no_gradient_reaches_masked_pixels():
    """The whole encoder-decoder path: neither the loss nor any prediction (at every position) depends on a masked
    patch's pixels; the visible pixels do get gradients."""
    m = _mae()
    batch = _batch(m)
    images, masks = batch["views"][0][0].clone().requires_grad_(True), batch["masks"][0]
    m({"views": [images[None]], "masks": batch["masks"]})["loss"].backward()
    grad = patchify(images.grad, m.patch).abs().sum(-1)                     # [B, N]
    assert torch.all(grad[masks] == 0) and torch.all(grad[~masks] > 0)
    images.grad = None
    m.predict(images, masks).sum().backward()
    grad = patchify(images.grad, m.patch).abs().sum(-1)
    assert torch.all(grad[masks] == 0) and torch.all(grad[~masks] > 0)
    with torch.no_grad():   # and forward: other pixels under the masks, the same predictions
        other = images + 5 * unpatchify(masks[..., None].float().expand(-1, -1, 48), m.grid, m.patch)
        torch.testing.assert_close(m.predict(other, masks), m.predict(images, masks), rtol=0, atol=0)


def test_maes_initialisation_and_fixed_tables():
    m = _mae()
    vit = m.backbone
    h, w = m.grid
    pe = vit.pos_embed
    assert not pe.requires_grad and pe.shape == (1, 1 + h * w, 192)
    torch.testing.assert_close(pe[0, 1:].double(), ref_sincos(192, h, w), rtol=0, atol=2e-6)
    assert torch.equal(pe[0, 0], torch.zeros(192))                           # the class token's row
    torch.testing.assert_close(m.decoder_pos_embed[0].double(), ref_sincos(64, h, w), rtol=0, atol=2e-6)
    assert "decoder_pos_embed" not in m.state_dict() and "backbone.pos_embed" in m.state_dict()

    def xavier(weight, fan_in, fan_out):   # uniform in +-b, b = sqrt(6 / (fan_in + fan_out)): max near b, std b / sqrt(3)
        # (the std tells it from torch's default kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in): for the patch
        # projection 0.144 vs xavier's 0.158, whose maxima alone are too close to tell apart)
        bound = math.sqrt(6 / (fan_in + fan_out))
        return 0.9 * bound < weight.abs().max().item() <= bound and abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.04
    assert xavier(vit.patch_embed.proj.weight, 3 * 4 * 4, 192)               # as a Linear [192, 48], not a conv
    qkv = vit.blocks[0].attn.qkv
    assert xavier(qkv.weight, 192, 576) and torch.equal(qkv.bias, torch.zeros(576))
    assert xavier(m.decoder_pred.weight, 64, 48) and xavier(m.decoder_blocks[1].mlp.fc1.weight, 64, 256)
    assert 0.01 < vit.cls_token.std().item() < 0.03 and 0.01 < m.mask_token.std().item() < 0.03
    assert m.decoder_norm.eps == 1e-6 and m.decoder_blocks[0].norm1.eps == 1e-6


def test_encoder_init_keep_leaves_the_backbone_as_built():
    """encoder_init: keep (a warm start, timm's init): the weights are the backbone's, the position embedding learned."""
    from pretrain.models import create_backbone
    from pretrain.methods.mae import MAE

    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2})
    before = copy.deepcopy(vit.state_dict())
    m = MAE(vit, image_size=16, decoder_dim=64, decoder_depth=1, decoder_heads=4, encoder_init="keep")
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())
    assert m.backbone.pos_embed.requires_grad


def test_a_warm_start_is_never_reinitialised(tmp_path):
    """model.pretrained_file with encoder_init: mae is a one-line error (MAE's init would overwrite the file's weights,
    silently); with keep the encoder is the file's, its position embedding learned."""
    from safetensors.torch import save_file

    from pretrain.models import create_backbone

    torch.manual_seed(3)
    src = create_backbone("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2, "dynamic_img_size": True,
                                                   "drop_path_rate": 0.0})
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"method.encoder_init=mae would re-initialise .*set method.encoder_init=keep"):
        _mae(f"model.pretrained_file={path}")
    m = _mae(f"model.pretrained_file={path}", "method.encoder_init=keep")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in m.backbone.state_dict().items())
    assert m.backbone.pos_embed.requires_grad


def test_parameter_groups():
    """No weight decay on biases, norms, the class and mask tokens; the frozen pos_embed in no group; every other
    weight (encoder and decoder) decayed."""
    m = _mae()
    groups = m.param_groups(0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"backbone.cls_token", "mask_token", "decoder_norm.weight", "decoder_pred.bias"} <= plain
    assert "backbone.pos_embed" not in decay | plain
    assert decay == {n for n, p in m.named_parameters() if p.ndim >= 2 and n not in ("backbone.cls_token", "backbone.pos_embed")}


def test_views_and_bad_settings():
    assert _mae().views == (MAE_VIEW,) and MAE_VIEW.crop_scale == (0.2, 1.0) and MAE_VIEW.jitter_p == 0
    with pytest.raises(ValueError, match=r"method.decoder_heads=5 does not divide method.decoder_dim=64"):
        _mae("method.decoder_heads=5")
    with pytest.raises(ValueError, match=r"method.mask_ratio=0.95 masks all 16 patches"):
        _mae("method.mask_ratio=0.95")
    with pytest.raises(ValueError, match=r"needs a timm ViT.*model.name=vit_\*"):
        create_method(load_config(None, ["data.train=x", "method.name=mae", "model.name=resnet10t"]))
    with pytest.raises(ConfigError, match=r"method.encoder_init must be one of mae, keep"):
        _mae("method.encoder_init=timm")


def test_reference_config_is_the_papers_recipe():
    """facebookresearch/mae PRETRAIN.md (--norm_pix_loss --mask_ratio 0.75 --warmup_epochs 40 --blr 1.5e-4
    --weight_decay 0.05, 8 nodes x 8 GPUs x 64 = 4096) with --model mae_vit_base_patch16 (models_mae.py: decoder 512
    wide, 8 blocks, 16 heads), main_pretrain.py's AdamW betas (0.9, 0.95) and views; 1600 epochs (paper table 3)."""
    c = load_config(str(CONFIGS / "mae_vit_base_imagenet.yaml"))
    assert (c.method.name, c.model.name, c.data.image_size) == ("mae", "vit_base_patch16_224", 224)
    assert (c.method.mask_ratio, c.method.norm_pix_loss, c.method.decoder_dim, c.method.decoder_depth,
            c.method.decoder_heads, c.method.decoder_mlp_ratio) == (0.75, True, 512, 8, 16, 4.0)
    assert (c.train.global_batch_size, c.train.epochs, c.train.clip_grad) == (4096, 1600, 0.0)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.warmup_epochs, c.optim.min_lr) == (
        "adamw", 1.5e-4, "linear", 0.05, 40, 0.0)
    assert list(c.optim.betas) == [0.9, 0.95]
    m = create_method(c)
    assert m.grid == (14, 14) and m.masking.num_masked == 147 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16 and m.decoder_pred.out_features == 16 * 16 * 3
    assert sum(p.numel() for p in m.backbone.parameters() if p.requires_grad) == pytest.approx(85.6e6, rel=0.01)


# ------------------------------------------------------------------------------------------------ reconstruct: bad args
@pytest.mark.parametrize("args,msg", [
    ([], "either --images FILE [FILE ...] or --data SHARDS"),
    (["--images", "a.png", "--data", "x"], "either --images FILE [FILE ...] or --data SHARDS (not both)"),
    (["--data", "x", "--n", "0"], "--n must be >= 1, got 0"),
])
def test_reconstruct_bad_arguments_are_one_line_errors(capsys, tmp_path, args, msg):
    line = inproc_error_line(capsys, "reconstruct", tmp_path / "no_run", "--out", tmp_path / "g.png", *args)
    assert msg in line


# ------------------------------------------------------------------------------------------------ end to end
def _args(shards, run_dir, **kv):
    base = {"model.name": "vit_tiny_patch16_224", "model.kwargs": "{img_size: 16, patch_size: 4, depth: 2, "
            "dynamic_img_size: true, drop_path_rate: 0.0}", "method.decoder_dim": 64, "method.decoder_depth": 1,
            "method.decoder_heads": 4, "train.global_batch_size": 16, "checkpoint.every_steps": 2,
            "train.channels_last": "false", "optim.warmup_steps": 1, "data.val": f"{shards}/val", **kv}
    ov = [o for o in train_overrides(shards, run_dir, **{k.replace(".", "__"): v for k, v in base.items()})
          if not o.startswith("method.proj_")]
    return ["configs/digits_mae.yaml", *ov]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_shards):
    """A 4-step digits MAE run, and the same run continued from its step-2 checkpoint in another run dir."""
    d = tmp_path_factory.mktemp("mae")
    full, part = d / "full", d / "part"
    cli("train", *_args(digits_shards, full), check=True)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000002.pt", part / "checkpoints")
    cli("train", *_args(digits_shards, part), check=True)
    return full, part


@pytest.mark.slow
def test_resume_draws_the_same_masks(runs):
    """Steps 3-4 after a resume have bit-equal losses (a per-batch loss over random masks: other masks, another
    value) and the final weights are equal."""
    full, part = runs
    a, b = tb_scalars(full), tb_scalars(part)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)
    assert len(set(a.values())) == 4
    sa = torch.load(find_checkpoint(full), map_location="cpu", weights_only=True)["model"]
    sb = torch.load(find_checkpoint(part), map_location="cpu", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_export_is_the_encoder_and_loads_in_timm(runs, tmp_path):
    """The export is the encoder alone (no decoder, the sin-cos pos_embed in it); timm loads it and gives the
    method's kNN features (the pooled class token of the full, unmasked image)."""
    from pretrain.export import load_method

    full, _ = runs
    out = tmp_path / "encoder.safetensors"
    cli("export", full, "--out", out, check=True)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                            num_classes=0, img_size=16, patch_size=4, depth=2, dynamic_img_size=True).eval()
    method, _, step = load_method(full)
    method.eval()
    assert step == 4
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit(x), method.features(x))
    torch.testing.assert_close(vit.pos_embed, method.backbone.pos_embed)
    assert not any(k.startswith("decoder") for k in vit.state_dict())


@pytest.mark.slow
def test_reconstruct_cli_draws_the_grid(runs, tmp_path, digits_shards, capsys):
    """--data: 4 rows (original, masked, pasted, raw) x --n columns of 16 px cells upscaled 8x; row 3 keeps the
    originals' visible patches; the same seed draws the same picture. --images works too."""
    from pretrain.cli import main

    full, _ = runs
    out = tmp_path / "grid.png"
    p = cli("reconstruct", full, "--data", f"{digits_shards}/val", "--n", "5", "--out", out, "--seed", "3", check=True)
    cell = 16 * 8
    size = (5 * (cell + 1) + 1, 4 * (cell + 1) + 1)
    assert f"{size[0]}x{size[1]} px" in p.stdout and "MAE step 4" in p.stdout
    with Image.open(out) as im:
        grid = np.array(im)
    assert grid.shape == (size[1], size[0], 3)
    cells = [[grid[1 + r * (cell + 1):1 + r * (cell + 1) + cell, 1 + c * (cell + 1):1 + c * (cell + 1) + cell]
              for c in range(5)] for r in range(4)]
    # the masked input and the pasted reconstruction agree on the visible patches (4 of 16), nowhere else required
    same = [(cells[1][c] == cells[2][c]).all(-1).mean() for c in range(5)]
    assert all(s >= 4 / 16 for s in same), same
    assert main(["reconstruct", str(full), "--data", f"{digits_shards}/val", "--n", "5", "--out", str(tmp_path / "b.png"),
                 "--seed", "3"]) == 0
    with Image.open(tmp_path / "b.png") as im:
        assert np.array_equal(np.array(im), grid)
    png = tmp_path / "digit.png"
    Image.fromarray(cells[0][0][::8, ::8]).save(png)
    assert main(["reconstruct", str(full), "--images", str(png), str(png), "--out", str(tmp_path / "i.png")]) == 0
    with Image.open(tmp_path / "i.png") as im:
        assert im.size == (2 * (cell + 1) + 1, 4 * (cell + 1) + 1)
    line = inproc_error_line(capsys, "reconstruct", full, "--images", tmp_path / "nope.png", "--out", tmp_path / "x.png")
    assert "image" in line and "not found" in line


@pytest.mark.slow
def test_reconstruct_refuses_a_run_that_is_not_mae(ref_run, tmp_path, capsys):
    run_dir = ref_run[0]
    line = inproc_error_line(capsys, "reconstruct", run_dir, "--data", "x", "--out", tmp_path / "g.png")
    assert "is a simclr run" in line and "method.name=mae" in line
    assert not (tmp_path / "g.png").exists()
