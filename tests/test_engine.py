"""The engine end to end through the CLI: outputs, pruning, exact resume, atomic checkpoints,
gradient accumulation, mixed precision; and the optimizer and schedule pieces."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REF_EVERY, REF_STEPS
from helpers import WORKERS, cli, run, tb_scalars, tmp_debris, train_overrides
from pretrain.config import load_config
from pretrain.engine.checkpoint import PATTERN, find_checkpoint, list_checkpoints
from pretrain.engine.optim import LARS, build_optimizer
from pretrain.schedules import cosine, scaled_lr, warmup_cosine


def _ckpt_names(run_dir):
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


# ------------------------------------------------------------------------------------------------ end to end
def test_train_cli_writes_run_outputs(ref_run):
    run_dir, _, metrics = ref_run
    assert (run_dir / "config.yaml").is_file()
    log = (run_dir / "log.txt").read_text()
    assert f"step {REF_STEPS} train/loss=" in log and "eval/knn_top1=" in log
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    losses = tb_scalars(run_dir)
    assert sorted(losses) == list(range(1, REF_STEPS + 1))
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    assert set(tb_scalars(run_dir, "train/lr")) == set(losses)
    assert _ckpt_names(run_dir) == [f"step_{s:08d}.pt" for s in range(REF_EVERY, REF_STEPS + 1, REF_EVERY)]
    # the last line of stdout is the final metrics, with the kNN monitor on data.val
    assert metrics["loss"] == pytest.approx(losses[REF_STEPS], rel=1e-4)
    assert 0.0 <= metrics["knn_top1"] <= 1.0 and metrics["skipped_samples"] == 0
    assert tmp_debris(run_dir) == []


def test_checkpoint_loads_with_weights_only(ref_run):
    run_dir, _, _ = ref_run
    ckpt = find_checkpoint(run_dir)
    assert ckpt.name == f"step_{REF_STEPS:08d}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == REF_STEPS
    assert {"model", "optimizer", "scaler", "config", "rng", "extra", "epoch"} <= set(state)
    assert any(k.startswith("backbone.") for k in state["model"]) and any(k.startswith("projector.") for k in state["model"])


def test_keep_last_prunes_old_checkpoints(tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    cli("train", experiment, *train_overrides(digits_shards, run_dir, train__max_steps=5, checkpoint__every_steps=1,
                                              checkpoint__keep_last=2, log__tensorboard="false"), check=True)
    assert _ckpt_names(run_dir) == ["step_00000004.pt", "step_00000005.pt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000005.pt"]
    assert not (run_dir / "tb").exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_from_step_k_matches_uninterrupted_run(tmp_path, ref_run, experiment):
    """The reference run went 0 -> 6 in one go with checkpoints at 3 and 6. A fresh run dir that holds
    only its step-3 checkpoint, trained with the same config, must log the same losses for steps
    4..6 and end with the same weights."""
    ref_dir, overrides, _ = ref_run
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ref_dir / "checkpoints" / f"step_{REF_EVERY:08d}.pt", run_dir / "checkpoints")
    ov = [o for o in overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    cli("train", experiment, *ov, check=True)
    assert f"resumed from step {REF_EVERY}" in (run_dir / "log.txt").read_text()

    want, got = tb_scalars(ref_dir), tb_scalars(run_dir)
    assert sorted(got) == list(range(REF_EVERY + 1, REF_STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got, want)
    # losses do move over these steps, so equal losses are not a coincidence of a frozen model
    assert len({round(v, 5) for v in got.values()}) > 1

    a = torch.load(ref_dir / "checkpoints" / f"step_{REF_STEPS:08d}.pt", weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoints" / f"step_{REF_STEPS:08d}.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
@pytest.mark.slow
def test_killed_checkpoint_save_keeps_previous_and_resume_cleans_up(tmp_path, digits_shards, experiment, backend):
    run_dir = tmp_path / "run"
    kv = dict(train__backend="deepspeed", optim__name="adamw", optim__lr=1e-3) if backend == "deepspeed" else {}
    ov = train_overrides(digits_shards, run_dir, train__max_steps=4, checkpoint__every_steps=2, **kv)
    # DDP: one torch.save per checkpoint; DeepSpeed: model states, then each rank's optimizer shard
    per_ckpt = 1 if backend == "ddp" else 2
    p = run([sys.executable, WORKERS / "kill_during_save.py", per_ckpt + 1, "train", experiment, *ov], timeout=240)
    assert p.returncode == 17, p.stderr[-3000:]       # died inside the 2nd save (step 4)
    ckpts = run_dir / "checkpoints"
    first = "step_00000002.pt" if backend == "ddp" else "step_00000002"
    assert _ckpt_names(run_dir) == [first]
    assert not any(PATTERN.match(f.name) and "00000004" in f.name for f in ckpts.iterdir())
    assert tmp_debris(ckpts)    # the half-written save is there, and ignored
    if backend == "ddp":
        state = torch.load(find_checkpoint(run_dir), map_location="cpu", weights_only=True)
        assert state["step"] == 2

    # resuming continues from step 2 and leaves no debris of the killed save behind
    cli("train", experiment, *ov, check=True)
    assert "resumed from step 2" in (run_dir / "log.txt").read_text()
    assert _ckpt_names(run_dir) == [first, first.replace("2", "4")]
    assert tmp_debris(run_dir) == []


# ------------------------------------------------------------------------------------------------ accumulation
class _Regression(__import__("pretrain.methods", fromlist=["Method"]).Method):
    """A method with a per-sample loss (no BatchNorm, no contrast between samples), for which
    accumulating two half batches must give exactly the full-batch gradient."""
    num_views = 1

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))

    def training_step(self, batch, ctx):
        return {"loss": ((self.backbone(batch["x"]) - batch["y"]) ** 2).mean()}


@pytest.mark.parametrize("optim", ["sgd", "lars", "adamw"])
def test_grad_accumulation_equals_full_batch(optim):
    from pretrain.engine.backends import DDPBackend

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    results = {}
    for accum in (1, 2, 4):
        cfg = load_config(None, ["data.train=x", f"train.grad_accum={accum}", f"optim.name={optim}"])
        be = DDPBackend(_Regression(), cfg, torch.device("cpu"))
        be.set_lr(0.05)
        losses = []
        for step in range(2):
            for i, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
                with be.accumulate(last=i == accum - 1):
                    loss = be.forward({"x": xb, "y": yb})["loss"]
                    be.backward(loss)
                losses.append(loss.item())
            be.step()
        results[accum] = (sum(losses[:accum]) / accum, [p.detach().clone() for p in be.module.parameters()])
    for accum in (2, 4):
        assert results[accum][0] == pytest.approx(results[1][0], rel=1e-6)
        for a, b in zip(results[accum][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _first_losses(experiment, overrides, local_batch, n):
    """fp32 losses of micro-batches 0..n-1 of a run's data stream, before any update, computed
    here from the library with the run's seed (as the engine should have)."""
    from pretrain.data import build_train_loader
    from pretrain.methods import create_method

    cfg = load_config(str(experiment), overrides)
    torch.manual_seed(cfg.seed)
    method = create_method(cfg).train()
    data = build_train_loader(cfg, method, local_batch, 1000, 0, "cpu").batches(0)
    with torch.no_grad():
        return [method(next(data))["loss"].item() for _ in range(n)]


def test_engine_feeds_micro_batches_and_logs_their_mean(tmp_path, digits_shards, experiment):
    """With grad_accum=2 the step-1 loss the engine logs is the mean of the losses of micro-batches
    0 and 1 of the data stream."""
    run_dir = tmp_path / "accum"
    ov = train_overrides(digits_shards, run_dir, train__max_steps=1, train__grad_accum=2)
    cli("train", experiment, *ov, check=True)
    mine = _first_losses(experiment, ov, 16, 2)
    assert tb_scalars(run_dir)[1] == pytest.approx(sum(mine) / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.slow
def test_mixed_precision_runs_on_cpu(tmp_path, digits_shards, experiment, precision):
    # CPU fp16 convolutions are very slow: a batch of 16, 2 steps. 32 px: see SIZE in test_deepspeed.py
    # (a PyTorch CPU bf16 conv-gradient bug on 1x1 feature maps that 16 px inputs would hit)
    run_dir = tmp_path / precision
    ov = train_overrides(digits_shards, run_dir, train__max_steps=2, train__precision=precision,
                         train__global_batch_size=16, data__image_size=32)
    cli("train", experiment, *ov, check=True)
    losses = tb_scalars(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    # the first step's loss agrees with fp32 on the same data and weights, to low-precision accuracy,
    # and is not the fp32 value itself (autocast was on)
    fp32 = _first_losses(experiment, ov, 16, 1)[0]
    assert losses[1] == pytest.approx(fp32, rel=3e-2)
    assert losses[1] != pytest.approx(fp32, rel=1e-6)
    scaler = torch.load(find_checkpoint(run_dir), weights_only=True)["scaler"]["main"]
    if precision == "fp16":   # GradScaler is on, and its scale is saved for resume
        assert scaler.get("scale", 0) > 0
    else:
        assert not scaler


# ------------------------------------------------------------------------------------------------ LARS
def test_lars_excludes_bias_and_norm_parameters():
    from pretrain.methods import create_method

    cfg = load_config(None, ["data.train=x", "model.name=resnet10t", "method.proj_hidden_dim=32", "optim.name=lars"])
    method = create_method(cfg)
    groups = method.param_groups(1e-4)
    opt = build_optimizer(groups, cfg.optim)
    names = {id(p): n for n, p in method.named_parameters()}
    excluded = [names[id(p)] for g in opt.param_groups if g["lars_exclude"] for p in g["params"]]
    included = [names[id(p)] for g in opt.param_groups if not g["lars_exclude"] for p in g["params"]]
    norm_params = {f"{mn}.{pn}" for mn, m in method.named_modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) for pn, _ in m.named_parameters(recurse=False)}
    biases = {n for n, _ in method.named_parameters() if n.endswith(".bias")}
    assert norm_params and norm_params <= set(excluded) and biases <= set(excluded)
    assert not (set(included) & (norm_params | biases))
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for g in opt.param_groups if not g["lars_exclude"]
               for p in g["params"])
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.0 if g["lars_exclude"] else 1e-4)


def test_lars_update_rule():
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    gw, gb = torch.randn(4, 3), torch.randn(4)
    lr, wd, eta = 0.5, 0.01, 0.001
    opt = LARS([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": wd, "lars_exclude": True}],
               lr=lr, momentum=0.9, trust_coefficient=eta)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + wd * w0
    want_w = w0 - lr * eta * w0.norm() / d.norm() * d      # trust ratio, weight decay
    want_b = b0 - lr * gb                                   # plain SGD: no decay, no trust ratio
    torch.testing.assert_close(w.detach(), want_w)
    torch.testing.assert_close(b.detach(), want_b)


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 5), (10, 0), (6, 5)])
def test_warmup_then_cosine(total, warmup):
    base, final = 0.8, 0.01
    lrs = [warmup_cosine(s, total, base, warmup, final) for s in range(total + 1)]
    assert all(0 < v <= base + 1e-12 for v in lrs[:total])
    if warmup:
        assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))      # increasing during warmup
        assert lrs[warmup - 1] == pytest.approx(base)                       # peak at the end of warmup
    after = lrs[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))                    # monotonic decrease after
    assert lrs[total] == pytest.approx(final)                               # ends at min_lr
    if warmup < total:
        assert lrs[warmup] == pytest.approx(base)


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 10, 1.0, 0.2) == pytest.approx(1.0)
    assert cosine(5, 10, 1.0, 0.2) == pytest.approx(0.6)
    assert cosine(10, 10, 1.0, 0.2) == pytest.approx(0.2)
    assert cosine(50, 10, 1.0, 0.2) == pytest.approx(0.2)


def test_scaled_lr():
    assert scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "none") == pytest.approx(0.3)
    with pytest.raises(ValueError):
        scaled_lr(0.3, 256, "cubic")


def test_plan_batch_and_steps(digits_shards):
    from pretrain.engine import plan

    n = json.loads((digits_shards / "train" / "index.json").read_text())["samples"]
    cfg = load_config(None, [f"data.train={digits_shards}/train", "train.global_batch_size=64", "train.grad_accum=2",
                             "train.epochs=3", "optim.warmup_epochs=1"])
    p = plan(cfg, 2)
    assert p["local_batch"] == 16 and p["steps_per_epoch"] == n // 64
    assert p["total"] == 3 * (n // 64) and p["warmup"] == n // 64


def test_ddp_backend_clips_the_global_grad_norm():
    """train.clip_grad bounds the update: the returned norm is the pre-clip norm, the applied
    gradient's norm is at most clip_grad."""
    from pretrain.config import load_config
    from pretrain.engine.backends import DDPBackend
    from pretrain.methods import create_method

    cfg = load_config(None, ["data.train=unused", "model.name=resnet10t", "method.proj_hidden_dim=32",
                             "train.clip_grad=0.05", "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0"])
    torch.manual_seed(0)
    backend = DDPBackend(create_method(cfg), cfg, torch.device("cpu"))
    backend.set_lr(1.0)
    before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    batch = {"views": [torch.randn(2, 8, 3, 16, 16)]}
    backend.backward(backend.forward(batch)["loss"])
    norm = backend.step()
    assert float(norm) > 0.05                  # the raw gradient is larger than the bound...
    update = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in backend.module.named_parameters()))
    assert float(update) == pytest.approx(0.05, rel=1e-3)   # ...and plain SGD at lr 1 moved by exactly the bound


def test_vit_no_weight_decay_set_is_respected():
    """timm's ViT lists pos_embed and cls_token in no_weight_decay(): they are 3-D, so a rule by tensor rank alone
    decays them, against timm's param_groups_weight_decay and every ViT recipe (MoCo v3, DINO, MAE)."""
    from pretrain.methods import create_method

    cfg = load_config(None, ["data.train=x", "method.name=moco_v3", "model.name=vit_tiny_patch16_224",
                             "model.kwargs={img_size: 32, patch_size: 8}", "data.image_size=32",
                             "method.proj_hidden_dim=32", "method.pred_hidden_dim=32", "method.proj_dim=16"])
    method = create_method(cfg)
    names = {id(p): n for n, p in method.named_parameters()}
    groups = method.param_groups(0.1)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    timm_nwd = {f"backbone.{n}" for n in method.backbone.no_weight_decay()} & set(names.values())
    assert {"backbone.pos_embed", "backbone.cls_token"} <= timm_nwd
    assert timm_nwd <= plain and not (timm_nwd & decayed)
    # everything else follows the usual rule: matrices decayed, biases and norm parameters not
    assert "backbone.patch_embed.proj.weight" in decayed and "backbone.blocks.0.attn.qkv.weight" in decayed
    assert "backbone.blocks.0.norm1.weight" in plain and "backbone.blocks.0.attn.qkv.bias" in plain
    # the frozen momentum encoder is in no group at all
    assert not any(n.startswith("key_") for n in decayed | plain)
