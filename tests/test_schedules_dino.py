"""Schedules for any hyper-parameter (pretrain/schedules.py), the on_gradients hook under each backend, and
DINO/iBOT end to end: schedules logged, exact resume, the last-layer freeze, bf16 under DDP and ZeRO-2/3."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from helpers import SMALL_VIT, cli, tb_scalars, torchrun, train_overrides
from pretrain.config import ConfigError, load_config
from pretrain.engine.checkpoint import find_checkpoint, list_checkpoints
from pretrain.methods import create_method
from pretrain.methods.base import Method
from pretrain.schedules import Schedule, StepContext


# ------------------------------------------------------------------------------------------------ Schedule
def test_schedule_shapes_against_their_definitions():
    """Each shape at hand-computed points (not through our own formula): DINO's teacher-temperature warmup,
    its cosine momentum and weight decay, the one-epoch freeze, and the LR's linear warmup then cosine."""
    temp = Schedule.parse({"shape": "linear", "start": 0.04, "end": 0.07, "epochs": 30})
    assert [temp(s, 1000, 10) for s in (0, 150, 300, 999)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    mom = Schedule.parse({"shape": "cosine", "start": 0.996, "end": 1.0})
    assert [mom(s, 100, 7) for s in (0, 50, 100)] == pytest.approx([0.996, 0.998, 1.0])
    assert mom(25, 100) == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    freeze = Schedule.parse({"shape": "step", "start": 1, "end": 0, "epochs": 1})
    assert [freeze(s, 100, 4) for s in range(6)] == [1, 1, 1, 1, 0, 0]
    lr = Schedule(1.0, 0.0, "cosine", warmup_steps=4)
    assert [lr(s, 14) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(9, 14) == pytest.approx(0.5) and lr(14, 14) == pytest.approx(0.0)
    assert Schedule.parse(0.5)(123, 1000) == 0.5 and Schedule.parse(0.5).to_config() == 0.5


@pytest.mark.parametrize("bad,why", [({"shape": "wiggly", "start": 1}, "shape"), ({"end": 1}, "start"),
                                     ({"start": 1, "epochs": 1, "steps": 2}, "not both"), ({"start": 1, "when": 2}, "when")])
def test_bad_schedules_are_one_line_errors(bad, why):
    cfg = load_config("configs/digits_dino.yaml", ["data.train=x", *SMALL_VIT])
    cfg.method.teacher_temp = bad
    with pytest.raises(ConfigError, match=why) as e:
        create_method(cfg)
    assert "method.teacher_temp" in str(e.value) and "\n" not in str(e.value)


def test_a_schedule_on_the_command_line_and_for_weight_decay():
    """`method.momentum.start=0.9` edits one field of a scheduled default; optim.weight_decay takes a schedule."""
    cfg = load_config("configs/digits_dino.yaml", ["data.train=x", "method.momentum.start=0.9",
                                                   "optim.weight_decay.end=0.3"])
    assert dict(cfg.method.momentum) == {"shape": "cosine", "start": 0.9, "end": 1.0}
    assert dict(cfg.optim.weight_decay) == {"shape": "cosine", "start": 0.04, "end": 0.3}


# ------------------------------------------------------------------------------------------------ hooks
class _Hooked(Method):
    """Two linear layers; on_gradients zeroes `a`'s gradient while ctx["freeze"] > 0 and doubles `b`'s."""

    defaults = {"freeze": {"shape": "step", "start": 1, "end": 0, "steps": 1}}
    scheduled = ("freeze",)

    def __init__(self):
        super().__init__(nn.Linear(3, 3))
        self.b = nn.Linear(3, 3)
        self.seen = []

    def param_groups(self, wd, phase="main"):
        return [{"params": list(self.backbone.parameters()), "weight_decay": wd},
                {"params": list(self.b.parameters()), "weight_decay": 0.0}]

    def training_step(self, batch, ctx):
        self.seen.append(ctx.step)
        return {"loss": self.b(self.backbone(batch["x"])).pow(2).mean()}

    def on_gradients(self, ctx, grads):
        self.grads_seen = {n: grads.get(p).detach().clone() for n, p in self.named_parameters()}
        if ctx["freeze"] > 0:
            grads.zero_(self.backbone.parameters())
        for p in self.b.parameters():
            grads.set(p, grads.get(p) * 2)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed", "fsdp"])
def test_on_gradients_edits_reach_the_optimizer_under_each_backend(backend):
    """Between the last backward and the optimizer step: a zeroed gradient (with no weight decay) leaves its
    parameters exactly in place, a doubled one moves them twice as far under SGD; the weight-decay value of the
    step reaches the decayed group only (wd_mult)."""
    from pretrain.engine.backends import create_backend

    cfg = load_config(None, ["data.train=x", f"train.backend={backend}", "optim.name=sgd", "optim.momentum=0.0",
                             "train.global_batch_size=4", "deepspeed.zero_stage=2"])
    torch.manual_seed(0)
    m = _Hooked()
    ref = _Hooked()
    ref.load_state_dict(m.state_dict())
    be = create_backend(m, cfg, torch.device("cpu"))
    be.set_lr(0.1, 0.1, weight_decay=0.0)
    x = torch.randn(4, 3)
    before = {n: _full(p).clone() for n, p in m.named_parameters()}
    ctx = m.step_context(0, 2, 1)
    be.backward(be.forward({"x": x}, ctx)["loss"])
    be.step(ctx)
    assert all(torch.equal(_full(p), before[n]) for n, p in m.named_parameters() if n.startswith("backbone"))
    ref.b(ref.backbone(x)).pow(2).mean().backward()
    for n, p in ref.named_parameters():
        if n.startswith("b."):   # SGD: p - lr * 2 * grad
            torch.testing.assert_close(_full(dict(m.named_parameters())[n]), p.detach() - 0.1 * 2 * p.grad,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.grads_seen[n], p.grad, rtol=1e-5, atol=1e-6)
    ctx = m.step_context(1, 2, 1)   # freeze over: the backbone moves
    be.backward(be.forward({"x": x}, ctx)["loss"])
    be.step(ctx)
    assert not all(torch.equal(_full(p), before[n]) for n, p in m.named_parameters() if n.startswith("backbone"))
    be.set_lr(0.1, 0.1, weight_decay=0.25)
    assert [g["weight_decay"] for g in be.param_groups()] == [0.25, 0.0]


def _full(p):
    """A parameter's whole value, whatever the backend did to it (FSDP2: a sharded DTensor)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


@pytest.mark.parametrize("backend", ["ddp", "deepspeed", "fsdp"])
def test_a_group_frozen_by_a_schedule_has_lr_zero_while_it_is_on(backend):
    """`frozen_by`: the group's LR is 0 while the named scheduled value is > 0, the scheduled LR after."""
    from pretrain.engine.backends import create_backend

    class Frozen(_Hooked):
        def param_groups(self, wd, phase="main"):
            return [{"params": list(self.backbone.parameters()), "weight_decay": wd},
                    {"params": list(self.b.parameters()), "weight_decay": wd, "frozen_by": "freeze"}]

        def on_gradients(self, ctx, grads):
            pass

    cfg = load_config(None, ["data.train=x", f"train.backend={backend}", "optim.name=adamw", "optim.weight_decay=0.1",
                             "train.global_batch_size=4", "deepspeed.zero_stage=2"])
    m = Frozen()
    be = create_backend(m, cfg, torch.device("cpu"))
    for step, want in ((0, [0.1, 0.0]), (1, [0.1, 0.1])):
        ctx = m.step_context(step, 2, 1)
        be.set_lr(0.1, 0.1, 0.1, ctx.values)
        assert [g["lr"] for g in be.param_groups()] == want
        before = [_full(p).clone() for p in m.b.parameters()]
        be.backward(be.forward({"x": torch.randn(4, 3)}, ctx)["loss"])
        be.step(ctx)
        assert all(torch.equal(_full(p), q) for p, q in zip(m.b.parameters(), before)) == (step == 0)   # AdamW: no decay either


def test_layer_decay_follows_dinov2():
    """DINO's layer_decay: DINOv2's get_vit_lr_decay_rate, written here from its definition -- embeddings at
    decay^(depth+1), block i at decay^(depth-i), the final norm and head at 1; patch_embed x patch_embed_lr_mult."""
    cfg = load_config("configs/digits_dino.yaml", ["data.train=x", *SMALL_VIT, "method.layer_decay=0.5",
                                                   "method.patch_embed_lr_mult=0.2"])
    m = create_method(cfg)
    scale = {id(p): g.get("lr_scale", 1.0) for g in m.param_groups(0.1) for p in g["params"]}
    depth = len(m.backbone.blocks)

    def want(name):
        if name.startswith("blocks."):
            return 0.5 ** (depth - int(name.split(".")[1]))
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            return 0.5 ** (depth + 1) * (0.2 if name.startswith("patch_embed") else 1.0)
        return 1.0
    for n, p in m.backbone.named_parameters():
        assert scale[id(p)] == pytest.approx(want(n)), n
    assert all(scale[id(p)] == 1.0 for p in m.head.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ DINO end to end
def _dino(shards, run_dir, name="dino", **kv):
    """A tiny DINO/iBOT run of the digits config: 2 steps per epoch, so the freeze covers steps 0-1."""
    base = {"model.name": "vit_tiny_patch16_224", "model.kwargs": "{img_size: 16, patch_size: 4, depth: 2, "
            "dynamic_img_size: true, drop_path_rate: 0.1}", "method.out_dim": 256, "method.hidden_dim": 64,
            "method.bottleneck_dim": 32, "train.global_batch_size": 16, "data.samples_per_epoch": 32,
            "checkpoint.every_steps": 2, "train.channels_last": "false", "optim.warmup_steps": 1,
            "method.teacher_temp.epochs": 1, "method.num_local_crops": 2, **kv}
    if name == "ibot":
        base["method.patch_out_dim"] = 256
    ov = [o for o in train_overrides(shards, run_dir, **{k.replace(".", "__"): v for k, v in base.items()})
          if not o.startswith("method.proj_")]
    return [f"configs/digits_{name}.yaml", *ov]


def _last_layer_directions(ckpt):
    w = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]["head.last_layer.weight_v"]
    return F.normalize(w.float(), dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_schedules_logged_freeze_holds_and_resume_is_exact(tmp_path, digits_shards, name):
    """4 steps in one go vs the same run resumed from its step-2 checkpoint: the same losses at steps 3-4 and the same final weights and centre(s);
    every schedule in TensorBoard with the values it should have; the last layer does not move at all in
    epoch 0 (its group's LR is 0) and does after."""
    full, part = tmp_path / "full", tmp_path / "part"
    cli("train", *_dino(digits_shards, full, name), check=True)
    # the same run (same total, so the same schedules) continued from its step-2 checkpoint in a new run dir
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000002.pt", part / "checkpoints")
    cli("train", *_dino(digits_shards, part, name), check=True)
    a, b = tb_scalars(full), tb_scalars(part)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)
    sa = torch.load(find_checkpoint(full), map_location="cpu", weights_only=True)
    sb = torch.load(find_checkpoint(part), map_location="cpu", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert any(k.startswith("center") for k in sa["extra"])
    assert all(torch.equal(sa["extra"][k], sb["extra"][k]) for k in sa["extra"] if k.startswith("center"))
    freeze = tb_scalars(full, "schedule/freeze_last_layer")   # logged at step+1 for the step it governed
    assert [freeze[s] for s in (1, 2, 3, 4)] == [1, 1, 0, 0]
    temp = tb_scalars(full, "schedule/teacher_temp")          # linear 0.04 -> 0.07 over 1 epoch (2 steps)
    assert [temp[s] for s in (1, 2, 3)] == pytest.approx([0.04, 0.055, 0.07])
    mom = tb_scalars(full, "schedule/momentum")
    assert mom[1] == pytest.approx(0.99) and mom[1] < mom[4] < 1.0
    wd = tb_scalars(full, "schedule/weight_decay")
    assert wd[1] == pytest.approx(0.04) and wd[1] < wd[4] < 0.4
    torch.manual_seed(0)
    cfg = load_config(*_dino_cfg(name, digits_shards, full))
    v0 = create_method(cfg).head.last_layer.weight_v.detach()
    init = F.normalize(v0.float(), dim=1)
    steps = {int(c.name.split("_")[-1].split(".")[0]): c for c in list_checkpoints(full / "checkpoints")}
    frozen = torch.load(steps[2], map_location="cpu", weights_only=True)["model"]["head.last_layer.weight_v"]
    assert torch.equal(frozen, v0)   # LR 0 in epoch 0: not moved, not decayed
    moved, held = ((_last_layer_directions(steps[k]) - init).abs().max().item() for k in (4, 2))
    assert moved > 1e-5 and moved > 20 * held, (moved, held)


def _dino_cfg(name, shards, run_dir):
    args = _dino(shards, run_dir, name)
    return args[0], args[1:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,backend,stage", [("dino", "deepspeed", 2), ("dino", "deepspeed", 3),
                                                ("ibot", "deepspeed", 3), ("ibot", "ddp", 0)])
def test_bf16_on_two_ranks(tmp_path, digits_shards, name, backend, stage):
    """DINO and iBOT train in bf16 on 2 ranks under DDP and ZeRO-2/3 (the freeze and per-parameter clipping
    through the gradient hook), with finite losses, and export the teacher."""
    run_dir = tmp_path / "run"
    torchrun("-m", "pretrain.cli", "train", *_dino(digits_shards, run_dir, name, **{
        "train.max_steps": 2, "train.precision": "bf16", "train.backend": backend, "deepspeed.zero_stage": stage}),
        timeout=600, check=True)
    losses = tb_scalars(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    cli("export", run_dir, "--out", tmp_path / "teacher.safetensors", check=True)


def test_train_tears_its_process_group_down(tmp_path, digits_shards):
    """`pretrain train` destroys the process group it created before returning: a group left alive at interpreter
    exit is what made a ZeRO-3 rank abort after training had finished ("terminate called without an active
    exception", exit -6: the flaky EMA and bench_scaling tests). In process, with DeepSpeed (which makes a group even
    for one process), twice: DeepSpeed's own references to the groups go with them, or the next engine in the same
    process fails on a group that is "not registered"."""
    import torch.distributed as dist

    from pretrain.cli import main

    for run in ("a", "b"):  # a second run in the same process must not meet DeepSpeed's cached (dead) groups
        assert main(["train", *[str(a) for a in _dino(digits_shards, tmp_path / run, **{
            "train.max_steps": 1, "train.backend": "deepspeed", "deepspeed.zero_stage": 3})]]) == 0
        assert not dist.is_initialized()


def _small_dino(name="dino", *extra):
    cfg = load_config(f"configs/digits_{name}.yaml", ["data.train=x", *SMALL_VIT, "method.out_dim=256",
                                                      "method.hidden_dim=64", "method.bottleneck_dim=32",
                                                      "method.num_local_crops=2", *extra])
    torch.manual_seed(0)
    return create_method(cfg)


def _views_batch(m, B=4):
    from pretrain.data.views import view_groups

    g = torch.Generator().manual_seed(0)
    batch = {"views": [torch.randn(len(i), B, 3, s, s, generator=g) for s, i in view_groups(m.views, 16)]}
    if m.masking is not None:
        batch["masks"] = m.masking(B, g)
    return batch


def test_monitor_and_export_choose_the_teacher_or_the_student():
    """DINO's default backbone (kNN monitor's eval.which, export's --which) is the teacher; `student` the other."""
    m = _small_dino().eval()
    with torch.no_grad():
        for p in m.key_backbone.parameters():
            p.add_(0.01)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m.features(x), m.key_backbone(x))
    torch.testing.assert_close(m.features(x, "teacher"), m.key_backbone(x))
    torch.testing.assert_close(m.features(x, "student"), m.backbone(x))
    assert not torch.allclose(m.features(x, "student"), m.features(x))
    with pytest.raises(ValueError, match="teacher"):
        m.features(x, "bogus")


@pytest.mark.parametrize("name,extra", [
    ("dino", ["method.centering=sinkhorn", "method.koleo_weight=0.1"]),
    ("ibot", ["method.centering=sinkhorn", "method.koleo_weight=0.1", "method.patch_head=separate",
              "method.patch_out_dim=128", "model.kwargs.reg_tokens=4"]),
    ("ibot", ["method.layer_decay=0.75", "method.patch_embed_lr_mult=0.2"])])
def test_dinov2_options_train(name, extra):
    """The DINOv2-style options (Sinkhorn-Knopp centering, KoLeo, a separate patch head, register tokens, layer
    decay) through the method: finite losses, every trainable parameter but the frozen-by-schedule ones gets a
    gradient, KoLeo reported."""
    m = _small_dino(name, *extra)
    out = m.training_step(_views_batch(m), m.step_context(5, 10, 2))
    assert torch.isfinite(out["loss"])
    if "method.koleo_weight=0.1" in extra:
        assert torch.isfinite(out["koleo"])
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
