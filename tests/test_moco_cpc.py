"""MoCo v2 / v3 and CPC: the momentum encoder, the queue, shuffle-BN, CPC's causality; with real
processes for what is distributed and the real CLI for resume and gradient accumulation."""
from __future__ import annotations

import shutil
from collections import deque

import pytest
import torch
import torch.nn as nn

from helpers import WORKERS, cli, tb_scalars, torchrun, train_overrides
from pretrain.config import load_config
from pretrain.engine.checkpoint import list_checkpoints
from pretrain.losses import queue_info_nce
from pretrain.schedules import Schedule
from pretrain.methods import create_method
from pretrain.methods.cpc import CPC
from pretrain.methods.moco_v2 import MoCoV2
from pretrain.models import EMA, ModelError, create_backbone, momentum_copy

SMALL = ["data.train=unused", "model.name=resnet10t", "data.image_size=16"]


def _moco(**kw):
    torch.manual_seed(0)
    kw = {"proj_hidden_dim": 32, "proj_dim": 8, "queue_size": 10, **kw}
    m = MoCoV2(create_backbone("resnet10t"), **kw)
    m.schedules["momentum"] = Schedule(0.9)
    return m


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_update_rule_and_frozen_copy():
    online = nn.Linear(4, 3)
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    t0 = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    EMA(target, online).update(0.75)
    for t, a, o in zip(target.parameters(), t0, online.parameters()):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * o)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("half", [False, True])
def test_fused_and_per_tensor_updates_follow_a_float64_reference(foreach, half):
    """Many tensors of several shapes, 20 updates at a changing momentum: the fused foreach_lerp_ update and the
    per-tensor loop both track the same EMA computed in float64 (bf16 targets: through their fp32 masters)."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5), nn.LayerNorm(5))
    target = momentum_copy(online)
    ref = [p.detach().double().clone() for p in target.parameters()]
    if half:
        target.bfloat16()
        ref = [r.bfloat16().double() for r in ref]   # the master starts from the bf16 target
    ema = EMA(target, online)
    for i in range(20):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
        m = 0.9 + 0.005 * i
        ema.update(m, foreach=foreach)
        ref = [m * r + (1 - m) * o.detach().double() for r, o in zip(ref, online.parameters())]
    masters = [ema._masters[(i, "full")] for i in range(len(ref))] if half else list(target.parameters())
    for got, want in zip(masters, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if half:   # and the bf16 targets are their masters rounded
        assert all(torch.equal(t, mm.bfloat16()) for t, mm in zip(target.parameters(), masters))


def test_ema_of_half_precision_weights_keeps_an_fp32_master():
    """At m=0.999 a bf16 EMA step is below bf16 resolution; the fp32 master must keep it moving."""
    online, target = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        online.weight.fill_(2.0)
        target.weight.fill_(1.0)
    online, target = online.bfloat16(), target.bfloat16()
    naive = target.weight.detach().clone()
    ema = EMA(target, online)
    for _ in range(200):
        ema.update(0.999)
        naive.mul_(0.999).add_(online.weight.detach(), alpha=0.001)
    want = 2.0 - 0.999 ** 200                                    # 1.181...
    assert target.weight.float().mean().item() == pytest.approx(want, rel=1e-2)
    assert naive.float().mean().item() == pytest.approx(1.0)     # what a bf16-only EMA does: nothing


def test_momentum_schedules():
    """method.momentum is a scheduled key: a cosine schedule reaches 1 at the last step, a number stays put."""
    m = _moco()
    m.schedules["momentum"] = Schedule.parse({"shape": "cosine", "start": 0.99, "end": 1.0})
    assert m.step_context(0, 100)["momentum"] == pytest.approx(0.99) and m.step_context(100, 100)["momentum"] == pytest.approx(1.0)
    assert m.step_context(50, 100)["momentum"] == pytest.approx(0.995)
    assert _moco().step_context(50, 100)["momentum"] == 0.9


# ------------------------------------------------------------------------------------------------ queue
@pytest.mark.parametrize("K,n,rounds", [(10, 4, 4), (10, 5, 3), (3, 4, 2)])
def test_queue_is_a_ring_buffer_for_any_size(K, n, rounds):
    """K not a multiple of the batch, and K smaller than the batch, against a deque of rows."""
    m = _moco(queue_size=K)
    ring = deque(m.queue.clone().unbind(0), maxlen=K)          # oldest first
    for r in range(rounds):
        k = torch.randn(n, 8)
        m.enqueue(k)
        ring.extend(k.unbind(0))
    # the queue holds the newest K rows; starting at the pointer they are in age order
    got = torch.roll(m.queue, -m.queue_ptr, 0)
    torch.testing.assert_close(got, torch.stack(list(ring)))
    assert m.queue_ptr == (n * rounds) % K if n <= K else True


def test_queue_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k = [torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(2)]
    queue = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    T = 0.2
    want = torch.stack([-torch.log_softmax(torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / T, 0)[0] for i in range(4)]).mean()
    torch.testing.assert_close(queue_info_nce(q, k, queue, T), want)


def test_split_bn_keys_come_back_in_order():
    """One process: keys() shuffles the batch into split-BN groups and must restore the order. In
    eval mode BN is per sample, so the result must equal the key encoder on the plain batch."""
    m = _moco().eval()
    x = torch.randn(12, 3, 16, 16)
    torch.testing.assert_close(m.keys(x), m._key(x))
    m.train()   # and in train mode the groups' own statistics make it differ from one big batch
    assert not torch.allclose(m.keys(x), m._key(x), atol=1e-4)


# ------------------------------------------------------------------------------------------------ 2 ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("moco") / "out.pt"
    torchrun(WORKERS / "moco_ranks.py", out, timeout=200, check=True)
    return torch.load(out, weights_only=False)


def test_shuffle_across_ranks_mixes_and_unshuffle_restores(two_ranks):
    parts = two_ranks["shuffle"]
    assert torch.equal(parts[0]["perm"], parts[1]["perm"])      # one permutation for all ranks
    shuffled = torch.cat([p["shuffled"] for p in parts]).flatten()
    ids = torch.cat([p["ids"] for p in parts]).flatten()
    assert sorted(shuffled.tolist()) == sorted(ids.tolist())    # every sample encoded exactly once
    assert not torch.equal(shuffled, ids)                       # and not in the original places
    for p in parts:
        torch.testing.assert_close(p["unshuffled"], p["ids"] * 10 + 1)


def test_queue_and_key_encoder_identical_on_every_rank(two_ranks):
    a, b = two_ranks["moco"]
    torch.testing.assert_close(a["queue"], b["queue"], rtol=0, atol=0)
    assert a["ptr"] == b["ptr"] == (4 * 12) % 20                 # 4 steps x 12 global keys, K=20
    # weights: identical (BN running statistics are per rank between DDP's buffer broadcasts, as with any BN)
    for k in a["key_backbone"]:
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(a["key_backbone"][k], b["key_backbone"][k], rtol=0, atol=0, msg=k)
    # the queue was really filled with keys (unit norm), not left at its random start
    assert torch.allclose(a["queue"].norm(dim=1), torch.ones(20), atol=1e-4)


def test_keys_with_shuffle_bn_across_ranks_come_back_in_order(two_ranks):
    for shuffled_path, direct in two_ranks["keys"]:
        torch.testing.assert_close(shuffled_path, direct, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ engine
MOCO = dict(method__name="moco_v2", method__queue_size=100, method__momentum=0.5, method__proj_hidden_dim=32,
            method__proj_dim=16)


@pytest.mark.slow
def test_moco_v2_resume_from_step_k_matches_uninterrupted_run(tmp_path, digits_shards, experiment):
    """Queue, pointer and key encoder restored exactly: a run resumed at step 3 logs the same losses
    for steps 4..6 as one that never stopped."""
    ref = tmp_path / "ref"
    ov = train_overrides(digits_shards, ref, train__max_steps=6, checkpoint__every_steps=3, **MOCO)
    cli("train", experiment, *ov, check=True)
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "checkpoints" / "step_00000003.pt", run_dir / "checkpoints")
    cli("train", experiment, *[o for o in ov if not o.startswith("run_dir=")], f"run_dir={run_dir}", check=True)
    want, got = tb_scalars(ref), tb_scalars(run_dir)
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got, want)
    a = torch.load(ref / "checkpoints" / "step_00000006.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=True)
    torch.testing.assert_close(b["extra"]["queue"], a["extra"]["queue"])
    assert a["extra"]["queue_ptr"] == b["extra"]["queue_ptr"] == (6 * 32) % 100


def test_grad_accumulation_updates_the_momentum_encoder_once_per_optimizer_step(tmp_path, digits_shards, experiment):
    """With 2 micro-batches per step and m=0.5: key_2 = 0.5 key_1 + 0.5 query_2, exactly once."""
    run_dir = tmp_path / "run"
    cli("train", experiment, *train_overrides(digits_shards, run_dir, train__max_steps=2, train__grad_accum=2,
                                              checkpoint__every_steps=1, checkpoint__keep_last=5, **MOCO), check=True)
    s1, s2 = [torch.load(p, weights_only=True)["model"] for p in list_checkpoints(run_dir / "checkpoints")]
    worst_once, worst_twice = 0.0, 0.0
    for name in s2:
        if name.startswith("key_backbone.") and s2[name].is_floating_point() and "running" not in name:
            q2 = s2[name.replace("key_", "", 1)]
            worst_once = max(worst_once, (s2[name] - (0.5 * s1[name] + 0.5 * q2)).abs().max().item())
            worst_twice = max(worst_twice, (s2[name] - (0.25 * s1[name] + 0.75 * q2)).abs().max().item())
    assert worst_once < 1e-6 and worst_twice > 1e-4, (worst_once, worst_twice)


# ------------------------------------------------------------------------------------------------ MoCo v3, CPC
def test_moco_v3_trains_a_vit():
    cfg = load_config(None, ["data.train=unused", "method.name=moco_v3", "model.name=vit_tiny_patch16_224",
                             "data.image_size=16", "model.kwargs.img_size=16", "model.kwargs.patch_size=4",
                             "model.kwargs.depth=2", "method.proj_hidden_dim=64", "method.pred_hidden_dim=64",
                             "method.proj_dim=32"])
    m = create_method(cfg)
    # the projector and predictor end in BatchNorm without affine parameters
    assert not m.projector[-1].affine and not m.predictor[-1].affine
    opt = torch.optim.AdamW([p for g in m.param_groups(0.0) for p in g["params"]], lr=1e-3)
    batch = {"views": [torch.randn(2, 8, 3, 16, 16)]}
    losses = []
    for step in range(3):
        loss = m.training_step(batch, m.step_context())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(m.step_context(step + 1, 3))
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert m.export_backbone("key") is m.key_backbone and m.export_backbone() is m.backbone


def test_cpc_context_is_causal_in_rows():
    """The context at row i must not depend on patches in rows below i (the ones it predicts)."""
    m = CPC(create_backbone("resnet10t"), patch_size=8, patch_stride=4, context_dim=16, image_size=24)  # 5 x 5 grid
    z = torch.randn(2, m.backbone.num_features, 5, 5, requires_grad=True)
    c = m.context(z)
    for i in range(5):
        (g,) = torch.autograd.grad(c[:, :, i].sum(), z, retain_graph=True)
        assert g[:, :, i + 1:].abs().max() == 0 if i < 4 else True
        assert g[:, :, i].abs().max() > 0
    out = m.training_step({"views": [torch.randn(1, 4, 3, 24, 24)]}, m.step_context())
    assert set(out) == {"loss", "loss_k1", "loss_k2"} and torch.isfinite(out["loss"])


def test_cpc_patch_grid():
    m = CPC(create_backbone("resnet10t"), patch_size=8, patch_stride=4, image_size=32)
    z = m.encode_patches(torch.randn(3, 3, 32, 32))
    assert m.grid == 7 and z.shape == (3, m.backbone.num_features, 7, 7)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides,match", [
    (["method.name=moco_v2", "method.queue_size=0"], "method.queue_size must be an integer >= 1, got 0"),
    (["method.name=moco_v2", "method.queue_size=-5"], "method.queue_size must be an integer >= 1, got -5"),
    (["method.name=moco_v2", "method.momentum=1.5"], r"method.momentum must be a number in \[0, 1\]"),
    (["method.name=moco_v3", "method.momentum=-0.1"], r"method.momentum must be a number in \[0, 1\]"),
    (["method.name=cpc", "method.patch_size=8", "method.patch_stride=3"], "do not tile data.image_size=16.*strides that fit"),
    (["method.name=cpc", "method.patch_size=20"], "need patch_size <= image_size"),
    (["method.name=cpc", "method.pred_steps=3"], "pred_steps=3 must be in"),
    (["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=30"], "img_size=30 is not divisible by the patch size 16"),
    (["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=32"], "built for 32 px inputs but will get 16 px"),
])
def test_bad_method_settings_are_clear_errors(overrides, match):
    cfg = load_config(None, SMALL + overrides)
    with pytest.raises((ValueError, ModelError), match=match):
        create_method(cfg)


def test_bad_queue_size_from_the_cli_is_one_line(tmp_path, digits_shards, experiment):
    from helpers import error_line

    p = cli("train", experiment, *train_overrides(digits_shards, tmp_path / "run", method__name="moco_v2",
                                                 method__queue_size=0), timeout=120)
    assert "method.queue_size must be an integer >= 1, got 0" in error_line(p)


def test_cpc_features_average_the_patch_grid():
    m = CPC(create_backbone("resnet10t"), patch_size=8, patch_stride=4, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m.features(x), m.encode_patches(x).mean((2, 3)))


def test_eval_knn_on_a_runs_own_features(ref_run, digits_shards):
    import json

    p = cli("eval", "knn", "--run", ref_run[0], "--train", f"{digits_shards}/train", "--val", f"{digits_shards}/val",
            check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert "method features" in r["backbone"] and 0 < r["top1"] <= 1
    # SimCLR's features are its backbone's: the same figure as the final online monitor on the same splits
    assert r["top1"] == pytest.approx(ref_run[2]["knn_top1"], abs=1e-4)   # both rounded when printed
