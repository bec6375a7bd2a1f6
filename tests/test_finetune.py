"""`pretrain finetune` and the `finetune` method (MAE's fine-tuning recipe): layer-wise LR decay against MAE's
numbering written here, the label-smoothing and mixup/cutmix losses against float64 references derived from the
mixed images themselves, mixing as a function of the batch seed, the engine's top-1 monitor, the CLI's one-line
errors, and end to end on the digits shards (top-1 per epoch in TensorBoard, exact resume, DeepSpeed on 2 ranks)."""
from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cli, inproc_error_line, tb_scalars, torchrun, train_overrides
from pretrain.config import ConfigError, load_config
from pretrain.data import DataError
from pretrain.methods import create_method

DEPTH = 3
VIT = ["model.name=vit_tiny_patch16_224", f"model.kwargs={{img_size: 16, patch_size: 4, depth: {DEPTH}, drop_path_rate: 0.0}}"]
K = 10


def _method(*extra, vit=True):
    cfg = load_config(None, ["data.train=x", "data.image_size=16", "method.name=finetune", f"method.num_classes={K}",
                             *(VIT if vit else ["model.name=resnet10t"]), *extra])
    torch.manual_seed(0)
    return cfg, create_method(cfg)


def _batch(B=6, seed=0):
    """One view [1, B, 3, 16, 16] and labels [B], as the pipeline delivers them (without the batch seed)."""
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(1, B, 3, 16, 16, generator=g)], "label": torch.randint(0, K, (B,), generator=g)}


# ------------------------------------------------------------------------------------------------ layer-wise LR decay
def _mae_layer(name: str) -> int:
    """facebookresearch/mae util/lr_decay.py get_layer_id_for_vit, from its definition: cls_token, pos_embed and
    patch_embed.* are layer 0, blocks.i is i + 1, anything else (norm, fc_norm, head) num_layers = depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_each_block_gets_the_lr_the_layer_decay_formula_says(backend):
    """After set_lr, every optimizer group's LR is base x decay^(L + 1 - layer) for each of its parameters (MAE's
    param_groups_lrd: lr_scale = decay^(num_layers - layer_id)), and its weight decay is 0 exactly for biases, norms,
    pos_embed and cls_token (MAE: 1-D parameters and the model's no_weight_decay())."""
    from pretrain.dist import cleanup
    from pretrain.engine.backends import create_backend

    cfg, m = _method("method.layer_decay=0.65", f"train.backend={backend}", "optim.name=adamw", "train.global_batch_size=4",
                     "deepspeed.zero_stage=2")
    names = {id(p): n for n, p in m.named_parameters()}
    groups = m.param_groups(0.05)
    be = create_backend(m, cfg, torch.device("cpu"))
    opt = be.optimizers["main"] if backend == "ddp" else be.engines["main"].optimizer
    base = 3e-3
    be.set_lr(base, base, 0.05, m.step_context().values)
    assert len(opt.param_groups) == len(groups)
    seen = set()
    for mine, got in zip(groups, opt.param_groups):
        for p in mine["params"]:
            n = names[id(p)]
            want = base * 0.65 ** (DEPTH + 1 - _mae_layer(n[len("backbone."):])) if n.startswith("backbone.") else base
            assert got["lr"] == pytest.approx(want, rel=1e-12), n
            plain = p.ndim == 1 or n in ("backbone.pos_embed", "backbone.cls_token")
            assert got["weight_decay"] == (0.0 if plain else 0.05), n
            seen.add(n)
    assert seen == set(names.values())   # every parameter once, in some group
    assert {n for n in seen if n.startswith("backbone.blocks.2.")} and DEPTH == 3
    if backend == "deepspeed":
        cleanup()


def test_resnets_get_no_layer_decay():
    _, m = _method("method.layer_decay=0.65", vit=False)
    assert all("lr_scale" not in g for g in m.param_groups(0.05))


def test_head_is_initialised_as_mae_and_avg_pooling_averages_the_patch_tokens():
    """main_finetune.py: trunc_normal_(head.weight, std=2e-5), bias 0. global_pool=avg (MAE's --global_pool): the mean
    over the patch tokens (not the class token) of timm's final-normed tokens; global_pool=backbone: timm's own output."""
    _, m = _method()
    assert torch.equal(m.head.bias, torch.zeros(K)) and m.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    m.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        tokens = m.backbone.forward_features(x)                       # [4, 1 + 16, D]
        torch.testing.assert_close(m.embed(x), tokens[:, 1:].mean(1))
        m.global_pool = "backbone"
        torch.testing.assert_close(m.embed(x), tokens[:, 0])          # vit_tiny's own pooling: the class token


# ------------------------------------------------------------------------------------------------ losses
def _spy(m, batch):
    """(loss, the images the classifier saw) for one training step."""
    seen = []
    logits = m.logits
    m.logits = lambda x: (seen.append(x.detach().clone()), logits(x))[1]
    try:
        loss = m(batch)["loss"]
    finally:
        del m.logits
    return loss, seen[0]


def _randomise_head(m):
    torch.nn.init.normal_(m.head.weight, std=0.3)
    torch.nn.init.normal_(m.head.bias, std=0.3)


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_label_smoothing_loss_matches_float64(eps):
    """Without mixing: mean_b [(1 - eps) (-log p_y) + eps mean_k (-log p_k)] (Szegedy et al.), in float64."""
    _, m = _method("method.mixup_alpha=0", "method.cutmix_alpha=0", f"method.label_smoothing={eps}")
    _randomise_head(m)
    batch = _batch()
    x, y = batch["views"][0][0], batch["label"]
    loss = m(batch)["loss"]
    with torch.no_grad():
        logp = torch.log_softmax(m.logits(x).double(), 1)                # [B, K]
    want = ((1 - eps) * -logp[torch.arange(len(y)), y] + eps * -logp.mean(1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def _mixing(x, xm):
    """What was done to x [B, 3, H, W] to give xm, read off the images: ("cutmix", lam) when xm is x with one
    rectangle (the same for every sample) pasted from the reversed batch, lam = 1 - its area fraction; else
    ("mixup", lam) with xm = lam x + (1 - lam) x.flip(0), lam fitted by least squares and the fit checked."""
    xf = x.flip(0)
    pasted, kept = (xm == xf).all(1).all(0), (xm == x).all(1).all(0)            # [H, W]
    if pasted.any() and (pasted | kept).all():
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        assert pasted.sum() == len(rows) * len(cols), "the pasted region is not a rectangle"
        return "cutmix", 1 - pasted.sum().item() / pasted.numel()
    d = (x - xf).double()
    lam = ((xm - xf).double() * d).sum().item() / d.pow(2).sum().item()
    torch.testing.assert_close(xm.double(), lam * x.double() + (1 - lam) * xf.double(), rtol=0, atol=1e-5)
    return "mixup", lam


def test_mixup_and_cutmix_losses_match_float64():
    """With MAE's mixing (mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1, one lambda per batch): for the images the
    classifier saw, the loss is the soft-target cross-entropy against lam s(y) + (1 - lam) s(y reversed), with
    s(y) = (1 - eps) onehot(y) + eps / K, computed in float64. Both kinds occur over ten batch seeds."""
    _, m = _method()
    _randomise_head(m)
    kinds = set()
    for seed in range(10):
        batch = {**_batch(seed=seed), "seed": 1000 + seed}
        x, y = batch["views"][0][0], batch["label"]
        loss, xm = _spy(m, batch)
        kind, lam = _mixing(x, xm)
        kinds.add(kind)
        smooth = lambda t: torch.nn.functional.one_hot(t, K).double() * 0.9 + 0.1 / K   # noqa: E731
        target = lam * smooth(y) + (1 - lam) * smooth(y.flip(0))                      # [B, K]
        with torch.no_grad():
            logp = torch.log_softmax(m.logits(xm).double(), 1)
        assert loss.item() == pytest.approx((-target * logp).sum(1).mean().item(), rel=1e-6), (seed, kind, lam)
    assert kinds == {"mixup", "cutmix"}


def test_mixing_is_a_function_of_the_batch_seed_alone():
    """The same batch seed mixes the same way whatever numpy's global RNG holds (timm's Mixup draws from it), numpy's
    state is left as it was, the batch itself is not modified, and another seed mixes differently."""
    _, m = _method()
    batch = {**_batch(seed=3), "seed": 77}
    x0 = batch["views"][0].clone()
    np.random.seed(1)
    before = np.random.get_state()
    l1, x1 = _spy(m, batch)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(before[1:3], after[1:3]))   # key and position unchanged
    np.random.seed(2)
    l2, x2 = _spy(m, batch)
    assert torch.equal(x1, x2) and l1.item() == l2.item()
    assert torch.equal(batch["views"][0], x0)
    _, x3 = _spy(m, {**batch, "seed": 78})
    assert not torch.equal(x1, x3)


def test_bad_labels_and_odd_batches_are_one_line_errors():
    _, m = _method()
    with pytest.raises(ConfigError, match="even per-rank batch, got 5") as e:
        m(_batch(B=5, seed=1))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="without a .cls label"):
        m({**_batch(), "label": torch.tensor([0, 1, -1, 2, 3, 4])})
    with pytest.raises(ConfigError, match="label is 12 but method.num_classes=10; set method.num_classes=13"):
        m({**_batch(), "label": torch.tensor([0, 1, 12, 2, 3, 4])})
    _, m = _method("method.mixup_alpha=0", "method.cutmix_alpha=0")
    assert torch.isfinite(m(_batch(B=5))["loss"])   # no mixing: any batch


# ------------------------------------------------------------------------------------------------ the reference recipe
def test_vit_base_config_is_maes_finetune_md_recipe():
    """configs/finetune_vit_base_mae.yaml against facebookresearch/mae FINETUNE.md's ViT-B command (--batch_size 32 on
    4 x 8 GPUs, --epochs 100, --blr 5e-4, --layer_decay 0.65, --weight_decay 0.05, --drop_path 0.1, --mixup 0.8,
    --cutmix 1.0) and main_finetune.py's defaults (--smoothing 0.1, --mixup_prob 1.0, --mixup_switch_prob 0.5,
    --mixup_mode batch, --warmup_epochs 5, --min_lr 1e-6, --global_pool, AdamW's default betas, no clipping), and its
    LR per iteration against util/lr_sched.py adjust_learning_rate at ImageNet's 1251 iterations per epoch."""
    from pretrain.engine.trainer import plan

    cfg = load_config("configs/finetune_vit_base_mae.yaml", ["data.train=x", "data.samples_per_epoch=1281167"])
    m = cfg.method
    assert (m.layer_decay, m.label_smoothing, m.mixup_alpha, m.cutmix_alpha, m.mixup_prob, m.mixup_switch_prob,
            m.mixup_mode, m.global_pool) == (0.65, 0.1, 0.8, 1.0, 1.0, 0.5, "batch", "avg")
    from omegaconf import OmegaConf

    assert cfg.model.kwargs.drop_path_rate == 0.1
    assert "num_classes" not in OmegaConf.load("configs/finetune_vit_base_mae.yaml").method   # the shards' index.json says
    assert (cfg.optim.name, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.min_lr) == ("adamw", [0.9, 0.999], 0.05, 1e-6)
    assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.train.clip_grad, cfg.train.precision) == (1024, 100, 0.0, "fp16")
    p = plan(cfg, 32)
    peak, its = 5e-4 * 1024 / 256, 1251
    assert p["lr"] == pytest.approx(peak) and p["steps_per_epoch"] == its and p["total"] == 100 * its

    def mae(it):   # adjust_learning_rate(optimizer, it / len(data_loader), args)
        epoch = it / its
        if epoch < 5:
            return peak * epoch / 5
        return 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / (100 - 5)))
    for step in (0, 1, 700, 6254, 6255, 6256, 40000, 125099):
        # the engine's warmup reaches each value one step earlier: (step + 1) / warmup
        want = mae(step + 1) if step < 5 * its else mae(step)
        assert p["schedules"]["lr"](step, p["total"], its) == pytest.approx(want, rel=1e-9, abs=1e-15), step


# ------------------------------------------------------------------------------------------------ the engine's monitor
def test_monitor_is_the_methods_unless_the_config_names_one():
    from pretrain.engine.trainer import MONITORS, monitor_for

    cfg, ft = _method("data.val=v")
    assert monitor_for(cfg, ft) is MONITORS["top1"]
    cfg.eval.monitor = "knn"
    assert monitor_for(cfg, ft) is MONITORS["knn"]
    cfg.data.val = None
    assert monitor_for(cfg, ft) is None
    simclr_cfg = load_config(None, ["data.train=x", "data.val=v", "model.name=resnet10t", "data.image_size=16"])
    simclr = create_method(simclr_cfg)
    assert monitor_for(simclr_cfg, simclr) is MONITORS["knn"]
    for key, value, message in (("monitor", "top1", "eval.monitor=top1 needs a classifier; simclr has none"),
                                ("monitor", "fid", "eval.monitor must be auto, knn or top1, got 'fid'"),
                                ("every_epochs", -1, "eval.every_epochs must be an integer >= 0")):
        bad = simclr_cfg.copy()
        bad.eval[key] = value
        with pytest.raises(ConfigError, match=message):
            monitor_for(bad, simclr)


def _shard_labels(split: Path):
    """Every .cls label of a split, read straight from its tar files."""
    out = []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as t:
            out += [int(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".cls")]
    return out


def test_top1_monitor_scores_the_val_shards(digits_shards):
    """A classifier that always answers class c scores the share of c among the val labels, read from the tars."""
    from pretrain.engine.trainer import top1_monitor

    cfg, m = _method(f"data.val={digits_shards}/val")
    bias = torch.full((K,), -5.0)
    bias[3] = 5.0
    m.logits = lambda x: bias.expand(len(x), K)
    labels = _shard_labels(digits_shards / "val")
    backend = types.SimpleNamespace(eval_module=lambda: m, device=torch.device("cpu"), dtype=None)
    got = top1_monitor(backend, cfg)
    assert got == {"top1": labels.count(3) / len(labels), "val_samples": len(labels)} and len(labels) == 180
    assert m.training   # left as it found it


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def backbone(tmp_path_factory, digits_shards, experiment):
    """A 2-block tiny ViT pretrained for one SimCLR step and written by `pretrain export` (in process)."""
    from pretrain.cli import main

    d = tmp_path_factory.mktemp("ft_backbone")
    ov = train_overrides(digits_shards, d / "pre", train__max_steps=1, model__name="vit_tiny_patch16_224",
                         model__kwargs="{img_size: 16, patch_size: 4, depth: 2, drop_path_rate: 0.0}")
    assert main(["train", str(experiment), *ov]) == 0
    assert main(["export", str(d / "pre"), "--out", str(d / "vit.safetensors")]) == 0
    return d / "vit.safetensors"


def _args(shards, backbone, *ov, config="configs/finetune_digits.yaml"):
    return ["finetune", backbone, "--train", shards / "train", "--val", shards / "val", "--config", config, *ov]


def _unlabelled(dirpath: Path) -> Path:
    """A shard of two PNGs without .cls members."""
    from PIL import Image

    dirpath.mkdir()
    with tarfile.open(dirpath / "shard-000000.tar", "w") as t:
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(buf, "PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))
    return dirpath


def test_cli_errors_are_one_line(capsys, tmp_path, digits_shards, backbone):
    from safetensors.torch import save_file

    line = inproc_error_line(capsys, *_args(digits_shards, tmp_path / "none.safetensors"))
    assert "none.safetensors not found" in line and "pretrain export" in line
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    line = inproc_error_line(capsys, *_args(digits_shards, tmp_path / "plain.safetensors"))
    assert "no plain.json and no pretrain metadata" in line
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    (tmp_path / "junk.json").write_text((backbone.with_suffix(".json")).read_text())
    line = inproc_error_line(capsys, *_args(digits_shards, tmp_path / "junk.safetensors"))
    assert "junk.safetensors is not a backbone written by `pretrain export`" in line
    line = inproc_error_line(capsys, "finetune", backbone, "--train", _unlabelled(tmp_path / "nolabels"),
                             "--val", digits_shards / "val")
    assert "--train" in line and "has no .cls labels" in line
    line = inproc_error_line(capsys, *_args(digits_shards, backbone, "method.num_classes=5", f"run_dir={tmp_path}/r"))
    assert "method.num_classes=5 but the train shards' index.json lists 10 classes" in line
    line = inproc_error_line(capsys, *_args(digits_shards, backbone, "method.mixup_alpha=0.8", "train.global_batch_size=33",
                                            f"run_dir={tmp_path}/r"))
    assert "mixup/cutmix need an even per-rank batch, got 33" in line


def test_config_layers_export_then_file_then_overrides(digits_shards, backbone):
    """The export fills the model and data keys the config file leaves unset, the shards' index.json the class
    count; the file's and the command line's own values win; the method, the backbone file and the shards are set."""
    from pretrain.finetune import finetune_config

    cfg = finetune_config(backbone, str(digits_shards / "train"), str(digits_shards / "val"), ["data.image_size=16"],
                          "configs/finetune_digits.yaml")
    meta = json.loads(backbone.with_suffix(".json").read_text())
    assert (cfg.method.name, cfg.model.name, cfg.model.pretrained_file) == ("finetune", meta["timm_name"], str(backbone))
    assert dict(cfg.model.kwargs) == {**meta["model_kwargs"], "drop_path_rate": 0.1}   # the file's drop path wins
    assert (cfg.method.num_classes, list(cfg.data.mean), cfg.data.train) == (10, meta["mean"], str(digits_shards / "train"))
    assert cfg.eval.every_epochs == 1 and cfg.method.layer_decay == 0.75


# ------------------------------------------------------------------------------------------------ end to end
def _e2e(shards, backbone, run_dir, **kv):
    """8 steps (2 epochs of 4 at batch 16) with MAE's mixing and drop path on, top-1 after each epoch."""
    base = {"run_dir": run_dir, "data.samples_per_epoch": 64, "train.global_batch_size": 16, "train.epochs": 2,
            "data.num_workers": 0, "data.shuffle_buffer": 64, "log.every_steps": 1, "log.progress": "false",
            "checkpoint.every_steps": 4, "checkpoint.keep_last": 10, "optim.warmup_steps": 2, "method.mixup_alpha": 0.8,
            "method.cutmix_alpha": 1.0, "model.kwargs.drop_path_rate": 0.1, **kv}
    return _args(shards, backbone, *[f"{k}={v}" for k, v in base.items()])


def _resumed(full: Path, part: Path, step: int):
    """part/: a run dir holding only full's checkpoint at `step` (the same run, continued from there)."""
    (part / "checkpoints").mkdir(parents=True)
    src = full / "checkpoints" / f"step_{step:08d}"
    if src.is_dir():
        shutil.copytree(src, part / "checkpoints" / src.name)
        for f in (full / "checkpoints").glob("latest*"):
            shutil.copy(f, part / "checkpoints")
    else:
        shutil.copy(src.with_suffix(".pt"), part / "checkpoints")


@pytest.mark.slow
def test_finetune_end_to_end_top1_each_epoch_and_exact_resume(tmp_path, digits_shards, backbone):
    """`pretrain finetune` prints the eval-schema line, logs eval/top1 at each epoch's end (steps 4 and 8) with the
    printed value last, and a run resumed from its step-4 checkpoint repeats steps 5-8 exactly (losses, top-1,
    weights): the mixing comes from the batch seeds, drop path from the restored RNG."""
    from pretrain.engine.checkpoint import find_checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    out = json.loads(cli(*_e2e(digits_shards, backbone, full), check=True).stdout.strip().splitlines()[-1])
    assert out == {"eval": "finetune", "backbone": str(backbone), "top1": out["top1"], "train": 1617, "val": 180,
                   "epochs": 2.0}
    top1 = tb_scalars(full, "eval/top1")
    assert sorted(top1) == [4, 8] and out["top1"] == round(top1[8], 4)
    saved = load_config(str(full / "config.yaml"))
    assert saved.model.pretrained_file == str(backbone) and saved.method.num_classes == 10
    _resumed(full, part, 4)
    cli(*_e2e(digits_shards, backbone, part), check=True)
    a, b = tb_scalars(full), tb_scalars(part)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b), (a, b)
    assert tb_scalars(part, "eval/top1") == {8: top1[8]}
    sa, sb = (torch.load(find_checkpoint(d), map_location="cpu", weights_only=True)["model"] for d in (full, part))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    again = cli(*_e2e(digits_shards, backbone, full))   # the finished run again: nothing to train or score
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        f"error: run_dir {full} already holds a finished run of 8 steps")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finetune_under_deepspeed_on_two_ranks(tmp_path, digits_shards, backbone):
    """ZeRO-2 on 2 ranks: top-1 logged at both epoch ends; the printed top-1 is the final weights' top-1 on the whole val
    split (each rank scores its shards, the counts are summed); a resume from step 2 repeats steps 3-4 exactly."""
    from pretrain.export import load_method
    from pretrain.data import eval_loader
    from pretrain.evaluation import extract_features

    full, part = tmp_path / "full", tmp_path / "part"
    ds = {"train.backend": "deepspeed", "deepspeed.zero_stage": 2, "data.samples_per_epoch": 32,
          "checkpoint.every_steps": 2}
    p = torchrun("-m", "pretrain.cli", *_e2e(digits_shards, backbone, full, **ds), timeout=600, check=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert sorted(tb_scalars(full, "eval/top1")) == [2, 4] and out["val"] == 180
    method, cfg, step = load_method(full)
    method.eval()
    pred, y = extract_features(lambda x: method.logits(x).argmax(1, keepdim=True),
                               eval_loader(str(digits_shards / "val"), 64, 16), torch.device("cpu"), cfg.data.mean, cfg.data.std)
    assert step == 4 and out["top1"] == round((pred.flatten().long() == y).float().mean().item(), 4)
    _resumed(full, part, 2)
    torchrun("-m", "pretrain.cli", *_e2e(digits_shards, backbone, part, **ds), timeout=600, check=True)
    a, b = tb_scalars(full), tb_scalars(part)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b) and all(math.isfinite(v) for v in a.values()), (a, b)
