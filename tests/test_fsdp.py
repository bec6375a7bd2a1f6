"""The FSDP2 backend (train.backend=fsdp): its sharding plan, DCP checkpoints (atomic, safe to read, re-sharded
on another world size), and real 2-rank runs (gloo) against DDP: losses, exact resume, export. The registry-wide
proofs (every method's loss and gradients at 2 ranks, EMA targets after 3 steps) are in test_rank_equivalence.py."""
from __future__ import annotations

import copy
import io
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from helpers import SMALL_VIT, cli, tb_scalars, torchrun, train_overrides
from pretrain.config import ConfigError, load_config, to_dict
from pretrain.engine.backends import create_backend
from pretrain.engine.checkpoint import CheckpointError, Checkpointer, find_checkpoint
from pretrain.engine.fsdp import FSDPBackend, SafeLoadPlanner, SafeReader, shard_units
from pretrain.methods import METHODS, create_method
from test_methods import _batch, _small

CPU = torch.device("cpu")


def _cfg(*extra, head=("method.proj_hidden_dim=32", "method.proj_dim=16")):
    return load_config(None, ["data.train=x", "model.name=resnet10t", "data.image_size=16", *head, "train.backend=fsdp",
                              "optim.name=adamw", "optim.lr=0.01", "train.global_batch_size=8", *extra])


def _full(module) -> dict:
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def _step(be, seed):
    g = torch.Generator().manual_seed(seed)
    batch = {"views": [torch.randn(2, 8, 3, 16, 16, generator=g)]}
    ctx = be.module.step_context(0, 10, 5)
    be.set_lr(0.01, 0.01, 0.0)
    loss = be.forward(batch, ctx)["loss"]
    be.backward(loss)
    be.step(ctx)
    return loss.item()


def _unit_names(m) -> list:
    units = shard_units(m)
    return sorted(n for n, x in m.named_modules() if any(x is u for u in units))


def test_every_block_and_stage_of_every_network_is_a_unit():
    """ViT blocks of the student and of the teacher (its EMA target must be sharded alike), ResNet stages."""
    cfg = load_config("configs/digits_dino.yaml", ["data.train=x", *SMALL_VIT])
    assert _unit_names(create_method(cfg)) == sorted(f"{net}.blocks.{i}" for net in ("backbone", "key_backbone")
                                                     for i in range(2))
    assert _unit_names(create_method(_cfg())) == [f"backbone.layer{i}" for i in range(1, 5)]


@pytest.mark.parametrize("override, why", [
    (["method.name=gan", "data.image_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"], "optimizers per step"),
    (["train.precision=fp16"], "sharded loss scaler"),
    (["train.channels_last=true"], "channels_last"),
])
def test_what_fsdp_does_not_do_is_a_one_line_error(override, why):
    cfg = _cfg(*override, head=())
    with pytest.raises(ConfigError, match=why) as e:
        create_backend(create_method(cfg), cfg, CPU)
    assert "\n" not in str(e.value)


def test_dcp_checkpoint_round_trip_and_consolidation(tmp_path):
    """One process (a group of one): save after a step, load into a differently initialised backend: the
    model, the AdamW state and so the next step are identical; export's consolidation reads the same weights."""
    torch.manual_seed(0)
    a = create_backend(create_method(_cfg()), _cfg(), CPU)
    _step(a, 1)
    ckpt = Checkpointer(tmp_path, a).save(1, 0, {"train": {"backend": "fsdp"}, "marker": 7}, {"x": torch.ones(2)})
    assert ckpt.is_dir() and not list(tmp_path.glob("checkpoints/.tmp-*"))
    torch.manual_seed(1)
    b = create_backend(create_method(_cfg()), _cfg(), CPU)
    assert not all(torch.equal(v, _full(a.module)[k]) for k, v in _full(b.module).items())
    state = Checkpointer(tmp_path, b).resume(ckpt)
    assert state["step"] == 1 and state["config"]["marker"] == 7 and torch.equal(state["extra"]["x"], torch.ones(2))
    full_a = _full(a.module)
    assert all(torch.equal(v, full_a[k]) for k, v in _full(b.module).items())
    sd, config = FSDPBackend.consolidate(ckpt)
    assert config["marker"] == 7 and set(sd) == set(full_a)
    assert all(torch.equal(sd[k], v.float() if v.is_floating_point() else v) for k, v in full_a.items())
    _step(a, 2), _step(b, 2)   # the optimizer state came back too: AdamW's next step is the same
    full_a = _full(a.module)
    assert all(torch.equal(v, full_a[k]) for k, v in _full(b.module).items())


@pytest.mark.slow
def test_compiled_method_under_fsdp_gives_eager_losses():
    """train.compile wraps the sharded method (aot_eager here: dynamo's tracing with eager kernels); 3 steps give
    the eager FSDP run's losses and weights."""
    runs = []
    for compile_ in ("false", "aot_eager"):
        torch.manual_seed(0)
        cfg = _cfg(f"train.compile={compile_}")
        be = create_backend(create_method(cfg), cfg, CPU)
        runs.append([_step(be, s) for s in range(3)] + [_full(be.module)])
    assert runs[1][:3] == pytest.approx(runs[0][:3], rel=1e-5)
    assert all(torch.allclose(runs[1][3][k], v, rtol=1e-4, atol=1e-6) for k, v in runs[0][3].items())


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))   # any callable: a real attack would name os.system


def test_dcp_metadata_and_objects_are_never_unpickled_unsafely(tmp_path):
    """DCP's own reader unpickles `.metadata` and non-tensor entries without restriction; ours refuses
    anything but the classes DCP writes."""
    torch.manual_seed(0)
    a = create_backend(create_method(_cfg()), _cfg(), CPU)
    _step(a, 1)
    ckpt = Checkpointer(tmp_path, a).save(1, 0, {"train": {"backend": "fsdp"}}, {})
    SafeReader(ckpt).read_metadata()   # a real one reads
    meta = ckpt / ".metadata"
    meta.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        SafeReader(ckpt).read_metadata()
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner(flatten_state_dict=False).load_bytes(None, io.BytesIO(_torch_saved(_Boom())))


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_resume_names_the_backend_a_checkpoint_needs(tmp_path):
    torch.manual_seed(0)
    ddp = create_backend(create_method(_cfg("train.backend=ddp")), _cfg("train.backend=ddp"), CPU)
    ckpt = Checkpointer(tmp_path, ddp).save(1, 0, {"train": {"backend": "ddp"}}, {})
    fsdp = create_backend(create_method(_cfg()), _cfg(), CPU)
    with pytest.raises(CheckpointError, match="train.backend=ddp and this run has train.backend=fsdp"):
        Checkpointer(tmp_path, fsdp).resume(ckpt)


# ------------------------------------------------------------------------------------------------ 2 ranks, gloo
def _run(experiment, shards, run_dir, backend, **kv):
    ov = train_overrides(shards, run_dir, train__backend=backend, optim__name="adamw", optim__lr=0.001,
                         checkpoint__every_steps=2, **kv)
    return torchrun("-m", "pretrain.cli", "train", experiment, *ov, timeout=600, check=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_match_ddp_resume_exactly_reshard_and_export(tmp_path, digits_shards, experiment):
    """SimCLR at W=2: FSDP2's losses are DDP's (fp32, summation-order tolerance); continued from its step-2
    checkpoint it gives bit-identical losses; the step-2 checkpoint loads on 1 rank (DCP re-shards) with
    the same weights; `pretrain export` writes DDP's backbone."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(experiment, digits_shards, ddp, "ddp")
    _run(experiment, digits_shards, fsdp, "fsdp")
    want, got = tb_scalars(ddp), tb_scalars(fsdp)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in got), (got, want)

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "tb").rename(tmp_path / "tb_first")
    _run(experiment, digits_shards, resumed, "fsdp")
    again = tb_scalars(resumed)
    assert sorted(again) == [3, 4] and all(again[s] == got[s] for s in again), (again, got)

    for run in (ddp, fsdp):
        cli("export", run, "--out", tmp_path / f"{run.name}.safetensors", check=True)
    a, b = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "fsdp.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)

    # written by 2 ranks, loaded by 1: every weight is the consolidated checkpoint's
    step2 = fsdp / "checkpoints" / "step_00000002"
    cfg = _cfg(f"data.train={digits_shards}/train")
    be = create_backend(create_method(cfg), cfg, CPU)
    be.load(step2)
    sd, _ = FSDPBackend.consolidate(step2)
    assert all(torch.equal(v, sd[k]) for k, v in _full(be.module).items() if v.is_floating_point())
    ref = torch.load(ddp / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    for k, v in ref.items():
        torch.testing.assert_close(sd[k].to(v.dtype), v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bf16_tracks_fp32(tmp_path, digits_shards, experiment):
    """bf16 compute weights, fp32 master and reduce: 2 steps at W=2 stay within bf16 rounding of fp32's losses."""
    _run(experiment, digits_shards, tmp_path / "fp32", "fsdp", train__max_steps=2)
    _run(experiment, digits_shards, tmp_path / "bf16", "fsdp", train__max_steps=2, train__precision="bf16")
    want, got = tb_scalars(tmp_path / "fp32"), tb_scalars(tmp_path / "bf16")
    assert sorted(got) == [1, 2] and all(got[s] == pytest.approx(want[s], rel=2e-2) for s in got), (got, want)
    assert find_checkpoint(tmp_path / "bf16") is not None


# ------------------------------------------------------------------------------------------------ every method
@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_checkpoints_and_evaluates_like_ddp(name, tmp_path):
    """Every registered method under FSDP2 in one process: 2 steps (with its before/after-step hooks: EMA
    targets, queues, prototypes) give DDP's losses and weights; its DCP checkpoint restores every weight, buffer
    and extra state; its eval copy extracts features. Two-optimizer methods are refused with a one-line error."""
    narrow = ["method.proj_hidden_dim=512", "method.proj_dim=512"] if name in ("vicreg", "barlow_twins") else []   # 8192 wide
    cfg, method = _small(name, "train.backend=fsdp", "optim.name=adamw", "optim.lr=1e-3", "train.global_batch_size=8",
                         *narrow)
    if len(method.phases) > 1:
        with pytest.raises(ConfigError, match="train.backend=ddp or deepspeed"):
            create_backend(method, cfg, CPU)
        return
    ddp_cfg = cfg.copy()
    ddp_cfg.train.backend = "ddp"
    ref = create_backend(copy.deepcopy(method), ddp_cfg, CPU)
    be = create_backend(method, cfg, CPU)
    batch = _batch(method)
    for step in range(2):
        losses = []
        for b in (ref, be):
            ctx = b.module.step_context(step, 10, 5)
            b.set_lr(1e-3, 1e-3, 0.05, ctx.values)
            b.module.before_step(ctx)
            torch.manual_seed(step)   # the same random draws (noise, timesteps, masks) on both sides
            loss = b.forward(batch, ctx)["loss"]
            b.backward(loss)
            b.step(ctx)
            b.module.after_step(ctx)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6), (step, losses)
    want, got = ref.module.state_dict(), _full(be.module)
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k].to(v.dtype), v, rtol=1e-3, atol=1e-5, msg=k)

    extra = be.module.extra_state()
    ckpt = Checkpointer(tmp_path, be).save(2, 0, cfg_dict := to_dict(cfg), extra)
    torch.manual_seed(5)
    again = create_backend(create_method(cfg), cfg, CPU)
    state = Checkpointer(tmp_path, again).resume(ckpt)
    again.module.load_extra_state(state["extra"])
    assert state["config"] == cfg_dict
    restored = _full(again.module)
    assert all(torch.equal(restored[k], v) for k, v in got.items()), name
    if method.backbone is not None:
        feats = again.eval_module().features(batch["views"][0][0])
        assert feats.shape[0] == batch["views"][0].shape[1] and torch.isfinite(feats).all()
