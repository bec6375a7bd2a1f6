"""I-JEPA (pretrain/methods/ijepa.py, pretrain/data/masking.py MultiBlockMasking): the multi-block masks' bounds,
disjointness, equal counts, determinism, truncation, relaxation order and context size; the loss, predictions and
targets against a float64 reference built sample by sample; the predictor's init; where the gradients go; the EMA target; the recipe against facebookresearch/ijepa's config; train, resume and export."""
from __future__ import annotations

import copy
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SMALL_VIT, cli, inproc_error_line, tb_scalars, train_overrides
from pretrain.config import load_config
from pretrain.data.masking import MultiBlockMasking
from pretrain.engine.checkpoint import find_checkpoint
from pretrain.methods import METHODS, create_method
from pretrain.models.vit import keep_indices

CONFIG = "configs/digits_ijepa.yaml"


def _sets(masks):
    """bool [1 + T, B, N] (True = not in the set) -> the sets themselves, True = in."""
    return ~masks


# ------------------------------------------------------------------------------------------------ masks
def _rect(flat, H, W):
    """(h, w) of the rectangle a [H*W] set fills exactly, or None if it is not a filled rectangle."""
    rows, cols = np.nonzero(flat.reshape(H, W).numpy())
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return (int(h), int(w)) if h * w == len(rows) else None


@pytest.mark.parametrize("grid", [14, 16])
def test_target_blocks_respect_scale_and_aspect_bounds(grid):
    """Over 300 batches (one block size per batch): every target is a filled rectangle whose sides are those of a
    block with area int(N s), s in [0.15, 0.2], and h / w in [0.75, 1.5] up to rounding each side (|h - h*| <= 1/2),
    the ranges' ends are reached, and positions reach the last row and column (the official collator's randint
    never does)."""
    m = MultiBlockMasking(grid)
    g = torch.Generator().manual_seed(0)
    N, sizes, last_row, last_col = grid * grid, set(), False, False
    for _ in range(300):
        targets = _sets(m(4, g))[1:]                                        # [4, B, N]
        for flat in targets.flatten(0, 1):
            hw = _rect(flat, grid, grid)
            assert hw is not None
            sizes.add(hw)
            grid_set = flat.reshape(grid, grid)
            last_row |= bool(grid_set[-1].any())
            last_col |= bool(grid_set[:, -1].any())
    lo_k, hi_k = int(N * 0.15), int(N * 0.2)
    for h, w in sizes:
        # some h* in [h - 1/2, h + 1/2], w* likewise, with h* w* in [lo_k, hi_k] and h*/w* in [0.75, 1.5]
        assert (h - 0.5) * (w - 0.5) <= hi_k and (h + 0.5) * (w + 0.5) >= lo_k, (h, w)
        assert (h - 0.5) / (w + 0.5) <= 1.5 and (h + 0.5) / (w - 0.5) >= 0.75, (h, w)
        assert 0.1 < h * w / N < 0.25 and 0.5 < h / w < 2
    areas, ratios = [h * w for h, w in sizes], [h / w for h, w in sizes]
    assert min(ratios) < 1 < max(ratios) and max(areas) - min(areas) >= 5, sizes   # both ends of the ranges drawn
    assert last_row and last_col


def test_context_and_targets_disjoint_equal_counts_deterministic():
    """At ViT-H/14's 16x16 grid (min_keep 10 never needs the relaxation there) and at the digits config's 4x4:
    the context and every target are disjoint (at 4x4: unless the targets leave <= min_keep of the 16 patches, where
    the official relaxation lets the context overlap one) and nonempty, each view keeps the same count in every row
    (keep_indices stacks them), the context keeps more than min_keep; the same generator state gives the same masks,
    another seed others; the masking pickles (it runs in loader workers)."""
    for grid, min_keep in ((16, 10), (4, 4)):
        m = pickle.loads(pickle.dumps(MultiBlockMasking(grid, min_keep=min_keep)))
        g = torch.Generator().manual_seed(1)
        for _ in range(100):
            masks = m(16, g)
            assert masks.shape == (5, 16, grid * grid) and masks.dtype == torch.bool
            sets = _sets(masks)
            overlap = (sets[0] & sets[1:].any(0)).any(-1)                           # [B]
            if grid == 16:
                assert not overlap.any()
            else:   # the 4x4 context block is the whole grid: it needs the relaxation iff the targets cover >= 12
                assert (sets[1:].any(0).sum(-1)[overlap] >= 16 - min_keep).all()
            for v in range(5):
                counts = sets[v].sum(-1)
                assert (counts == counts[0]).all() and counts[0] > 0
                assert keep_indices(masks[v]).shape == (16, counts[0])
            assert sets[0].sum(-1)[0] > min_keep
        a, b = (m(16, torch.Generator().manual_seed(7)) for _ in range(2))
        assert torch.equal(a, b) and not torch.equal(a, m(16, torch.Generator().manual_seed(8)))


def test_digits_grid_blocks_are_small_but_never_empty():
    """The digits config's 4x4 grid: the paper's target scale gives 1 to 4 patches per block (1x1, 1x2, 2x1, 2x2),
    the context 5 to 15 patches after the truncation; with the official min_keep 10 (impossible there when the
    targets cover 8 patches) the draw still ends, by the official relaxation (the context may then overlap them)."""
    m = MultiBlockMasking(4, min_keep=4)
    g = torch.Generator().manual_seed(0)
    seen_t, seen_c = set(), set()
    for _ in range(200):
        sets = _sets(m(8, g))
        seen_t.add(int(sets[1].sum(-1)[0]))
        seen_c.add(int(sets[0].sum(-1)[0]))
    assert seen_t <= {1, 2, 4} and {1, 2} <= seen_t and min(seen_c) >= 5 and max(seen_c) <= 15
    sizes = {m.block_size(u, m.target_scale, m.target_aspect) for u in np.linspace(0, 1, 1001)[:-1]}
    assert sizes == {(1, 2), (1, 1), (2, 1), (2, 2)}
    relaxed = _sets(MultiBlockMasking(4, min_keep=10)(64, torch.Generator().manual_seed(0)))
    assert (relaxed.sum(-1) > 0).all()


def test_truncation_keeps_the_first_patches_in_row_major_order():
    """As the official collator (`mask[:min_keep]` of the sorted indices): with contexts of 16 and 10 patches in one
    batch, both keep 10, the larger one its first 10 in row-major order."""
    m = MultiBlockMasking(4, num_targets=1, min_keep=0)
    full, part = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    part.flat[[1, 3, 4, 6, 8, 9, 11, 12, 14, 15]] = True
    blocks = iter([full, part])
    m._context = lambda targets, h, w, g: next(blocks)
    ctx = _sets(m(2, torch.Generator().manual_seed(0)))[0]                   # [2, 16]
    assert torch.equal(ctx[0], torch.arange(16) < 10)
    assert torch.equal(ctx[1], torch.from_numpy(part.reshape(-1)))


def test_relaxation_stops_removing_the_last_target_first():
    """The official loop: when no context block keeps more than min_keep, `masks_P[:-1]` (the last target is no
    longer removed). 4 x 4 grid, the whole-grid context, target 0 the top two rows, target 1 the bottom-left 2 x 2:
    removing both leaves 4 <= min_keep 5; dropping the last target leaves the bottom two rows (8 > 5)."""
    m = MultiBlockMasking(4, num_targets=2, min_keep=5)
    targets = np.zeros((2, 4, 4), bool)
    targets[0, :2] = True
    targets[1, 2:, :2] = True
    ctx = m._context(targets, 4, 4, torch.Generator().manual_seed(0))
    want = np.zeros((4, 4), bool)
    want[2:] = True
    assert np.array_equal(ctx, want)


def test_context_block_has_the_drawn_size():
    """At 16 x 16 with one image (no truncation): the context is a square block of side block_size(u) for scale
    0.85-1 (15 or 16) minus the targets, i.e. some such square contains the context and lies within context plus
    targets; in some draws only a 15 x 15 one does (the context is not always the whole grid), in others 16 x 16."""
    m = MultiBlockMasking(16)
    g = torch.Generator().manual_seed(0)
    whole = []
    for _ in range(60):
        sets = _sets(m(1, g))[:, 0].reshape(5, 16, 16).numpy()
        ctx, cover = sets[0], sets[0] | sets[1:].any(0)
        fits = []
        for side in (15, 16):
            for top in range(17 - side):
                for left in range(17 - side):
                    sq = np.zeros((16, 16), bool)
                    sq[top:top + side, left:left + side] = True
                    if not (ctx & ~sq).any() and not (sq & ~cover).any():
                        fits.append(side)
        assert fits, "the context is no square block minus the targets"
        whole.append(16 in fits)
    assert any(whole) and not all(whole)


def test_bad_masking_arguments_are_clear():
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlockMasking(14, target_scale=(0.3, 0.2))
    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMasking(14, min_keep=-1)


# ------------------------------------------------------------------------------------------------ the method
def _method(*extra, depth=2):
    cfg = load_config(CONFIG, ["data.train=x", *SMALL_VIT, "model.kwargs.depth=%d" % depth, "method.pred_depth=2",
                               "method.pred_embed_dim=48", *extra])
    torch.manual_seed(0)
    return create_method(cfg).train()


def _batch(m, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(1, B, 3, 16, 16, generator=g)], "masks": m.masking(B, g)}


def _official_sincos(dim, H, W):
    """facebookresearch/ijepa get_2d_sincos_pos_embed in float64 numpy, for an H x W grid (x = column first)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")

    def one(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    return np.concatenate([one(xs), one(ys)], 1)                       # [H*W, dim]: sin x, cos x, sin y, cos y


def test_predictor_position_embedding_is_the_official_sincos():
    """The same values as the official table, with the channels in timm's order (sin y, sin x, cos y, cos x)."""
    m = _method()
    ref = _official_sincos(48, 4, 4)
    q = 48 // 4
    reordered = np.concatenate([ref[:, 2 * q:3 * q], ref[:, :q], ref[:, 3 * q:], ref[:, q:2 * q]], 1)
    np.testing.assert_allclose(m.predictor.pos_embed.double().numpy(), reordered, atol=1e-6)
    assert not any(p is m.predictor.pos_embed for p in m.parameters())   # fixed: a buffer, not trained


def _reference(m, batch):
    """Float64, sample by sample from timm's pieces and the official sin-cos table: the context encoder on the
    context rows of one image at a time, the target encoder's forward_features, a hand-made layer norm, the
    predictor's blocks once per (image, target) -> {(b, t): (prediction [K_t, D], target [K_t, D])}."""
    r = copy.deepcopy(m).double()
    x = batch["views"][0][0].double()
    masks = batch["masks"]
    P, T, B = r.backbone.num_prefix_tokens, masks.shape[0] - 1, masks.shape[1]
    pe = torch.from_numpy(_official_sincos(r.predictor.pos_embed.shape[1], 4, 4))
    q = pe.shape[1] // 4
    pe = torch.cat([pe[:, 2 * q:3 * q], pe[:, :q], pe[:, 3 * q:], pe[:, q:2 * q]], 1)
    out = {}
    with torch.no_grad():
        h = r.key_backbone.forward_features(x)[:, P:]
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        for b in range(B):
            ctx = torch.nonzero(~masks[0, b]).flatten().tolist()
            tok = r.backbone._pos_embed(r.backbone.patch_embed(x[b:b + 1]))
            tok = torch.cat([tok[:, :P], tok[:, P:][:, ctx]], 1)
            s = r.backbone.norm(r.backbone.blocks(tok))[0, P:]                    # [K_c, D]
            z = r.predictor.embed(s) + pe[ctx]
            for t in range(T):
                tgt = torch.nonzero(~masks[1 + t, b]).flatten().tolist()
                seq = torch.cat([z, r.predictor.mask_token + pe[tgt]])[None]
                out[b, t] = r.predictor.proj(r.predictor.norm(r.predictor.blocks(seq)))[0, len(ctx):], h[b, tgt]
    return out


def _reference_loss(pairs, kind):
    """The loss by its formula over the reference's (prediction, target) pairs: the mean over every element."""
    d = torch.cat([(p - y).flatten() for p, y in pairs.values()])
    return (d ** 2 if kind == "l2" else torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5)).mean().item()


@pytest.mark.parametrize("kind", ["l2", "smooth_l1"])
def test_loss_matches_a_float64_reference(kind, monkeypatch):
    """The scalar loss, and (the scalar alone barely sees the predictor at init: predictions of rms ~0.1 against
    layer-normed targets of rms 1) the predictions and targets the loss reads, per image and per target block."""
    import pretrain.methods.ijepa as ijepa_mod

    m = _method(f"method.loss={kind}")
    with torch.no_grad():                       # a target encoder unlike the context encoder, as after training
        for p in m.key_backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(m, B=3)
    seen = []
    loss_fn = ijepa_mod.prediction_loss
    monkeypatch.setattr(ijepa_mod, "prediction_loss", lambda p, y, k: seen.append((p, y)) or loss_fn(p, y, k))
    loss = m.training_step(batch, m.step_context())["loss"]
    ref = _reference(m, batch)
    assert loss.item() == pytest.approx(_reference_loss(ref, kind), rel=1e-5)
    (pred, target), = seen                                                  # [T, B, K_t, D] each
    for (b, t), (p, y) in ref.items():
        torch.testing.assert_close(pred[t, b].detach().double(), p, rtol=1e-5, atol=1e-5, msg=f"pred {b} {t}")
        torch.testing.assert_close(target[t, b].double(), y, rtol=1e-5, atol=1e-5, msg=f"target {b} {t}")


def test_predictor_init_is_the_officials():
    """The official init_model (which re-initialises after the predictor's own fix_init_weight, so no 1/sqrt(2 l)
    rescale of attn.proj / mlp.fc2 survives): every Linear trunc-normal std 0.02 with zero bias, LayerNorm (1, 0),
    the mask token trunc-normal 0.02 (not zero)."""
    pred = _method("method.pred_embed_dim=96").predictor
    for name, mod in pred.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            assert (mod.bias == 0).all(), name
        elif isinstance(mod, torch.nn.LayerNorm):
            assert (mod.weight == 1).all() and (mod.bias == 0).all(), name
    assert pred.mask_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_gradients_reach_the_context_encoder_and_predictor_only():
    """No gradient to (or trainable parameter in) the target encoder; every context-encoder and predictor weight gets
    one; and the pixels of patches outside the context get exactly none (they never enter the context encoder, and
    the target encoder runs without gradients)."""
    m = _method()
    batch = _batch(m, B=4)
    x = batch["views"][0].clone().requires_grad_(True)
    m.training_step({**batch, "views": [x]}, m.step_context())["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in m.key_backbone.parameters())
    for name, p in m.named_parameters():
        if name.startswith(("backbone.blocks", "backbone.patch_embed", "predictor.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # pixel gradient per 4x4 patch: [B, 4, 4] over the grid, row-major like the masks
    g = x.grad[0].abs().sum(1).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2)).flatten(1)     # [B, 16]
    in_context = ~batch["masks"][0]
    assert (g[~in_context] == 0).all() and (g[in_context] > 0).all()


def test_target_encoder_is_an_ema_on_the_official_linear_schedule():
    """momentum at step s of S: 0.996 + 0.004 s / S (the official momentum_scheduler); after_step moves every target
    weight to m * target + (1 - m) * context (float64 reference)."""
    m = _method("method.momentum={shape: linear, start: 0.996, end: 1.0}")
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    S = 1000
    for s in (0, 250, 999):
        assert m.step_context(s, S, 10)["momentum"] == pytest.approx(0.996 + 0.004 * s / S, abs=1e-12)
    ctx = m.step_context(250, S, 10)
    mom = ctx["momentum"]
    before = {n: p.detach().double().clone() for n, p in m.key_backbone.named_parameters()}
    online = dict(m.backbone.named_parameters())
    m.after_step(ctx)
    for n, p in m.key_backbone.named_parameters():
        want = mom * before[n] + (1 - mom) * online[n].detach().double()
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7, msg=n)
    assert not torch.equal(m.key_backbone.blocks[0].attn.qkv.weight, m.backbone.blocks[0].attn.qkv.weight)


def test_export_and_features_default_to_the_target_encoder():
    """The paper evaluates the target encoder, average-pooled: default/target -> key_backbone, context -> backbone;
    without a class token (the configs) the exported timm model's own forward is exactly these features."""
    m = _method().eval()
    with torch.no_grad():
        for p in m.key_backbone.parameters():
            p.add_(0.01)
    x = torch.randn(2, 3, 16, 16)
    assert m.export_backbone() is m.key_backbone and m.export_backbone("target") is m.key_backbone
    assert m.export_backbone("context") is m.backbone
    torch.testing.assert_close(m.features(x), m.key_backbone(x))
    torch.testing.assert_close(m.features(x, "context"), m.backbone(x))
    torch.testing.assert_close(m.features(x), m.key_backbone.forward_features(x).mean(1))
    with pytest.raises(ValueError, match="target"):
        m.features(x, "bogus")
    # a class token (timm's default ViT): it goes through the encoders, the features still average the patches
    cls = _method("model.kwargs.class_token=true", "model.kwargs.global_pool=token").eval()
    torch.testing.assert_close(cls.features(x), cls.key_backbone.forward_features(x)[:, 1:].mean(1))
    assert torch.isfinite(cls.training_step(_batch(cls), cls.step_context())["loss"])


def test_bad_backbones_and_widths_are_one_line_errors(capsys, tmp_path, digits_shards):
    exp = tmp_path / "resnet.yaml"
    exp.write_text("method:\n  name: ijepa\nmodel:\n  name: resnet10t\ndata:\n  image_size: 16\n")
    common = [f"data.train={digits_shards}/train", "data.val=null", f"run_dir={tmp_path}/run"]   # no quickstart shards needed
    line = inproc_error_line(capsys, "train", exp, *common)
    assert "needs a timm ViT" in line and "model.name=vit_" in line
    common = [CONFIG, *common]
    line = inproc_error_line(capsys, "train", *common, "model.kwargs.fc_norm=true")
    assert "fc_norm=false" in line
    line = inproc_error_line(capsys, "train", *common, "method.pred_embed_dim=50")
    assert "method.pred_embed_dim=50" in line and "multiple of 4" in line


# ------------------------------------------------------------------------------------------------ recipes
def test_reference_config_is_the_official_vith14_recipe():
    """facebookresearch/ijepa configs/in1k_vith14_ep300.yaml (16 GPUs x 128 = batch 2048), written out here from
    the official file: the values, the single view (RandomResizedCrop 0.3-1 only) and the EMA schedule."""
    from pretrain.data.views import resolve_views
    from pretrain.schedules import Schedule

    c = load_config("configs/ijepa_vit_huge_imagenet.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("ijepa", "vit_huge_patch14_224", 224)
    kw = c.model.kwargs
    assert (kw.class_token, kw.global_pool, kw.fc_norm, kw.drop_path_rate) == (False, "avg", False, 0.0)
    assert (c.method.pred_depth, c.method.pred_embed_dim, c.method.pred_num_heads) == (12, 384, None)
    assert (c.method.num_targets, list(c.method.target_scale), list(c.method.target_aspect)) == (4, [0.15, 0.2], [0.75, 1.5])
    assert (list(c.method.context_scale), c.method.min_keep, c.method.loss) == ([0.85, 1.0], 10, "smooth_l1")
    assert (c.train.global_batch_size, c.train.epochs, c.train.precision) == (2048, 300, "bf16")
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.min_lr, c.optim.warmup_epochs) == (
        "adamw", 0.001, "none", 1e-6, 40)
    assert list(c.optim.betas) == [0.9, 0.999]
    assert dict(c.optim.weight_decay) == {"shape": "cosine", "start": 0.04, "end": 0.4}
    # the official momentum_scheduler: ema[0] + i * (ema[1] - ema[0]) / (ipe * epochs), per iteration
    ipe = 1281167 // 2048
    mom = Schedule.parse(c.method.momentum)
    for i in (0, 1, 1000, 300 * ipe - 1):
        assert mom(i, 300 * ipe, ipe) == pytest.approx(0.996 + i * 0.004 / (ipe * 300), abs=1e-12)
    (view,) = resolve_views(METHODS.get("ijepa").views, c.data.augment, c.data.views, c.data.image_size)
    assert (view.crop_scale, view.flip_p, view.jitter_p, view.grayscale_p, view.blur_p, view.solarize_p) == (
        (0.3, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0)


def test_method_defaults_are_the_papers():
    d = METHODS.get("ijepa").defaults
    assert (d["pred_depth"], d["pred_embed_dim"], d["num_targets"], d["min_keep"], d["loss"]) == (12, 384, 4, 10, "l2")
    assert d["momentum"] == {"shape": "linear", "start": 0.996, "end": 1.0}
    assert METHODS.get("ijepa").requires_vit and METHODS.get("ijepa").cross_rank_exact


# ------------------------------------------------------------------------------------------------ end to end
def _run(shards, run_dir, **kv):
    base = {"model.kwargs": "{img_size: 16, patch_size: 4, depth: 2, dynamic_img_size: true, class_token: false, "
            "global_pool: avg, fc_norm: false}", "method.pred_depth": 1, "method.pred_embed_dim": 48,
            "train.global_batch_size": 16, "data.samples_per_epoch": 32, "checkpoint.every_steps": 2,
            "optim.warmup_steps": 1, **kv}
    ov = [o for o in train_overrides(shards, run_dir, **{k.replace(".", "__"): v for k, v in base.items()})
          if not o.startswith(("method.proj_", "model.name"))]
    return [CONFIG, *ov]


@pytest.mark.slow
def test_train_resume_and_export_on_digits(tmp_path, digits_shards):
    """4 steps in one go vs the same run resumed from its step-2 checkpoint: the same losses at steps 3-4 and the same
    weights (masks drawn in the pipeline resume too); the momentum logged on its schedule; the exported target
    encoder loads into timm and its forward is the method's features."""
    from safetensors.torch import load_file

    from pretrain.export import load_method

    full, part = tmp_path / "full", tmp_path / "part"
    cli("train", *_run(digits_shards, full), check=True)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000002.pt", part / "checkpoints")
    cli("train", *_run(digits_shards, part), check=True)
    a, b = tb_scalars(full), tb_scalars(part)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)
    assert all(math.isfinite(v) for v in a.values())
    sa = torch.load(find_checkpoint(full), map_location="cpu", weights_only=True)["model"]
    sb = torch.load(find_checkpoint(part), map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    mom = tb_scalars(full, "schedule/momentum")
    assert mom[1] == pytest.approx(0.99) and mom[1] < mom[4] < 1.0
    assert tb_scalars(full, "train/context_patches")[1] >= 8
    for which in ("default", "context"):
        out = tmp_path / f"{which}.safetensors"
        cli("export", full, "--out", out, *(["--which", which] if which != "default" else []), check=True)
        method, cfg, _ = load_method(full)
        backbone = method.export_backbone(which)
        exported = load_file(str(out))
        assert set(exported) == set(backbone.state_dict())
        import timm

        model = timm.create_model(cfg.model.name, pretrained=True, num_classes=0, **dict(cfg.model.kwargs),
                                  pretrained_cfg_overlay=dict(file=str(out)))
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(model.eval()(x), method.eval().features(x, which))
