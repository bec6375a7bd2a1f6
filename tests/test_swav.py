"""SwAV: Sinkhorn-Knopp and the swapped-prediction loss against independent float64 references, Sinkhorn
over the global batch at 2 ranks, the prototype freeze under the backends' real steps, the queue, and the
paper's reference config. The multi-process parts run in tests/workers/swav_ranks.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import WORKERS, torchrun
from pretrain.config import load_config
from pretrain.engine.backends import DDPBackend
from pretrain.methods import create_method
from pretrain.losses.sinkhorn import sinkhorn
from pretrain.methods.swav import swapped_prediction

SMALL = ["data.train=unused", "model.name=resnet10t", "data.image_size=16", "method.name=swav",
         "method.num_local_crops=2", "method.local_crop_size=8", "method.num_prototypes=12",
         "method.proj_hidden_dim=32", "method.proj_dim=16"]


def _swav(*extra):
    cfg = load_config(None, SMALL + list(extra))
    torch.manual_seed(0)
    return cfg, create_method(cfg)


def _batch(seed, B=4):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(2, B, 3, 16, 16, generator=g), torch.randn(2, B, 3, 8, 8, generator=g)]}


def _cosines(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, 8, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.t()).numpy()


# ------------------------------------------------------------------------------------------------ references
def sinkhorn_ref(scores: np.ndarray, eps: float, iterations: int):
    """The paper's algorithm in float64, one row and one column at a time. scores [N, K] (every sample of
    the global batch) -> (codes [N, K], Q [K, N] before the final rescale)."""
    N, K = scores.shape
    Q = np.exp(scores / eps).T.copy()
    Q /= Q.sum()
    for _ in range(iterations):
        for k in range(K):                          # each prototype gets 1/K of the mass
            Q[k, :] = Q[k, :] / Q[k, :].sum() / K
        for n in range(N):                          # each sample gets 1/N
            Q[:, n] = Q[:, n] / Q[:, n].sum() / N
    return (Q * N).T, Q


def swapped_ref(scores: np.ndarray, codes: np.ndarray, T: float) -> float:
    """scores [V, B, K], codes [2, B, K]: mean over i in {0, 1}, v != i and b of -sum_k q log softmax(p / T)."""
    V, B, _ = scores.shape
    total = 0.0
    for i in range(codes.shape[0]):
        sub = 0.0
        for v in range(V):
            if v == i:
                continue
            for b in range(B):
                x = scores[v, b] / T
                logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
                sub -= (codes[i, b] * logp).sum() / B
        total += sub / (V - 1)
    return total / codes.shape[0]


@torch.no_grad()
def _scores64(method, views) -> np.ndarray:
    """Scores [V, B, K] of a float64 copy of `method` in train mode: the backbone once per crop size, the
    projector once over all crops, L2-normalised embeddings against row-normalised prototypes."""
    ref = copy.deepcopy(method).double()
    ref.queue = None
    V, B = sum(g.shape[0] for g in views), views[0].shape[1]
    feats = torch.cat([ref.backbone(g.double().flatten(0, 1)) for g in views])
    z = F.normalize(ref.projector(feats), dim=1).view(V, B, -1)
    return (z @ F.normalize(ref.prototypes.weight, dim=1).t()).numpy()


# ------------------------------------------------------------------------------------------------ Sinkhorn, loss
def test_sinkhorn_matches_the_float64_reference_and_its_marginals():
    s = _cosines(24, 7)
    got = sinkhorn(torch.tensor(s, dtype=torch.float32), 0.05, 3).double().numpy()
    want, Q = sinkhorn_ref(s, 0.05, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(Q.sum(0), 1 / 24, rtol=1e-12)            # columns: 1/B after the last step
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)             # codes: each sample's sum to 1
    # iterated to convergence, the rows (prototypes) sum to 1/K too: an equipartition
    _, Q = sinkhorn_ref(s, 0.05, 300)
    np.testing.assert_allclose(Q.sum(1), 1 / 7, rtol=1e-6)
    got = sinkhorn(torch.tensor(s, dtype=torch.float32), 0.05, 300).double().numpy()
    np.testing.assert_allclose(got.sum(0) / 24, 1 / 7, rtol=1e-4)


def test_sinkhorn_small_epsilon_does_not_overflow():
    s = _cosines(16, 5)
    got = sinkhorn(torch.tensor(s, dtype=torch.float32), 0.01, 3).double().numpy()   # exp(1/0.01) > float32 max
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, sinkhorn_ref(s, 0.01, 3)[0], rtol=1e-3, atol=1e-6)


def test_swapped_prediction_matches_the_float64_reference():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 6, 7, generator=g, dtype=torch.float64) * 2 - 1
    codes = torch.softmax(torch.randn(2, 6, 7, generator=g, dtype=torch.float64), -1)
    got = swapped_prediction(scores.float(), codes.float(), 0.1).item()
    assert got == pytest.approx(swapped_ref(scores.numpy(), codes.numpy(), 0.1), rel=1e-5)


def test_training_step_is_the_papers_loss_in_float64():
    """The whole step against a float64 copy: backbone once per crop size, projector over all crops, L2
    normalisation, normalised prototypes, codes from the two global crops only (the reference Sinkhorn)."""
    _, m = _swav()
    batch = _batch(0)
    loss = m(batch)["loss"].item()
    scores = _scores64(m, batch["views"])                                         # [V, B, K]
    codes = np.stack([sinkhorn_ref(scores[i], 0.05, 3)[0] for i in range(2)])
    assert loss == pytest.approx(swapped_ref(scores, codes, 0.1), rel=1e-4)


def test_prototypes_are_normalised_in_the_forward():
    """A rescaled prototype matrix is the same function (what weight decay would do to it): same loss."""
    _, m = _swav()
    a = m(_batch(0))["loss"].item()
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    assert m(_batch(0))["loss"].item() == pytest.approx(a, rel=1e-5)


# ------------------------------------------------------------------------------------------------ freeze
@pytest.mark.parametrize("optim", ["lars", "adamw", "sgd"])
def test_prototypes_frozen_for_the_first_epoch_under_the_engine_step(optim):
    """steps_per_epoch 2: after the backend's real steps 0 and 1 the prototypes are bit-identical to their
    start (weight decay 0.1 on, which would shrink them), at step 2 they move; the projector moves every step."""
    cfg, m = _swav(f"optim.name={optim}", "optim.weight_decay=0.1", "train.global_batch_size=4")
    be = DDPBackend(m, cfg, torch.device("cpu"))
    protos, proj = [m.prototypes.weight.detach().clone()], [m.projector[0].weight.detach().clone()]
    for step in range(3):
        be.set_lr(0.05)
        m.before_step(m.step_context(step, 3, 2))
        with be.accumulate(last=True):
            be.backward(be.forward(_batch(step))["loss"])
        be.step()
        protos.append(m.prototypes.weight.detach().clone())
        proj.append(m.projector[0].weight.detach().clone())
    assert torch.equal(protos[1], protos[0]) and torch.equal(protos[2], protos[0])
    assert not torch.equal(protos[3], protos[2])
    assert all(not torch.equal(proj[i + 1], proj[i]) for i in range(3))


def test_prototypes_have_their_own_group_without_weight_decay():
    _, m = _swav()
    groups = m.param_groups(0.1)
    proto = [g for g in groups if any(p is m.prototypes.weight for p in g["params"])]
    assert len(proto) == 1 and proto[0]["params"] == [m.prototypes.weight] and proto[0]["weight_decay"] == 0.0
    assert not proto[0]["lars_exclude"]                             # LARC adapts them in the official code
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


# ------------------------------------------------------------------------------------------------ queue
def test_queue_filled_from_global_crops_used_once_full_and_checkpointed():
    """queue_length 8 at batch 4 (one process): created at epoch_queue_starts, the newest global-crop
    embeddings first, used (prepended to the scores before Sinkhorn) only once full; extra_state restores
    it exactly, so the resumed method computes the same loss."""
    _, m = _swav("method.queue_length=8", "method.epoch_queue_starts=1")
    assert m.cross_rank_exact is False
    m.before_step(m.step_context(1, 10, 2))                                          # epoch 0: no queue yet
    m(_batch(1))
    assert m.queue is None
    seen = []
    for step in (2, 3):                                              # epoch 1: filled, not yet used
        m.before_step(m.step_context(step, 10, 2))
        with torch.no_grad():
            z = m.embed(_batch(step)["views"])[:2]
        out = m(_batch(step))["loss"]
        assert m.queue.shape == (2, 8, 16)
        torch.testing.assert_close(m.queue[:, :4], z, rtol=1e-5, atol=1e-6)      # newest first, per global crop
        seen.append(z)
    torch.testing.assert_close(m.queue[:, 4:], seen[0], rtol=1e-5, atol=1e-6)
    # step 4: the queue is full, so its scores join the batch's before Sinkhorn, and only the batch's codes count
    m.before_step(m.step_context(4, 10, 2))
    state = copy.deepcopy(m.extra_state())
    resumed = copy.deepcopy(m)
    resumed.queue, resumed.queue_filled = None, 0
    resumed.load_extra_state(state)
    torch.testing.assert_close(resumed.queue, m.queue, rtol=0, atol=0)
    queue = m.queue.double().numpy()
    b = _batch(4)
    loss = m(b)["loss"].item()
    assert resumed(b)["loss"].item() == loss
    scores = _scores64(resumed, b["views"])
    qscores = queue @ F.normalize(resumed.prototypes.weight.detach().double(), dim=1).numpy().T   # [2, 8, K]
    codes = np.stack([sinkhorn_ref(np.concatenate([qscores[i], scores[i]]), 0.05, 3)[0][-4:] for i in range(2)])
    assert loss == pytest.approx(swapped_ref(scores, codes, 0.1), rel=1e-4)
    no_queue = np.stack([sinkhorn_ref(scores[i], 0.05, 3)[0] for i in range(2)])
    assert abs(swapped_ref(scores, no_queue, 0.1) - loss) > 1e-4                   # the queue mattered


# ------------------------------------------------------------------------------------------------ 2 ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("swav") / "out.pt"
    torchrun(WORKERS / "swav_ranks.py", out, timeout=400, check=True)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_distributed_sinkhorn_equals_one_process_on_the_global_batch(two_ranks):
    parts = two_ranks["sinkhorn"]
    scores = torch.cat([p["scores"] for p in parts]).double().numpy()              # [12, 5]
    got = torch.cat([p["codes"] for p in parts]).double().numpy()
    want, _ = sinkhorn_ref(scores, 0.05, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # the per-rank Sinkhorn (each rank equipartitioning its own 6 samples) is another answer
    per_rank = np.concatenate([sinkhorn_ref(p["scores"].double().numpy(), 0.05, 3)[0] for p in parts])
    assert np.abs(per_rank - want).max() > 1e-2


@pytest.mark.slow
def test_queue_of_every_rank_is_checkpointed_and_restored(two_ranks):
    a, b = two_ranks["queue"]
    assert a["queue"].shape == (2, 12, 16)                          # queue_length 24 over 2 ranks
    assert not torch.equal(a["queue"], b["queue"])                  # per rank: each its own samples
    for r, part in enumerate((a, b)):
        torch.testing.assert_close(part["state_queue"][r], part["queue"], rtol=0, atol=0)
        torch.testing.assert_close(part["restored"], part["queue"], rtol=0, atol=0)
        assert part["filled"] == 8                                   # 2 steps of 4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_prototypes_frozen_at_two_ranks(two_ranks, backend):
    """2 ranks, AdamW with weight decay 0.05, steps_per_epoch 2: DDP and DeepSpeed ZeRO-2 leave the prototypes
    bit-identical for steps 0 and 1 and move them at step 2; the projector moves every step."""
    seen = two_ranks[f"freeze_{backend}"]
    protos, proj = [s[0] for s in seen], [s[1] for s in seen]
    assert torch.equal(protos[1], protos[0]) and torch.equal(protos[2], protos[0])
    assert not torch.equal(protos[3], protos[0])
    assert all(not torch.equal(proj[i + 1], proj[i]) for i in range(3))


# ------------------------------------------------------------------------------------------------ configs
def test_swav_resnet50_is_the_official_800_epoch_recipe():
    """facebookresearch/swav scripts/swav_800ep_pretrain.sh: 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), batch
    4096 (64 x 64), LARS(C) lr 4.8 unscaled, final 0.0048, wd 1e-6, 10 warmup epochs, 800 epochs, 3000
    prototypes of dimension 128 after a 2048 hidden layer, eps 0.05, 3 Sinkhorn iterations, T 0.1, no queue,
    prototypes frozen 313 iterations (1 epoch), SyncBN."""
    from pathlib import Path
    c = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "swav_resnet50.yaml"))
    assert (c.method.name, c.model.name, c.data.image_size) == ("swav", "resnet50", 224)
    assert c.model.kwargs.zero_init_last is False   # src/resnet50.py: zero_init_residual=False (timm's default: True)
    assert (c.train.global_batch_size, c.train.epochs) == (4096, 800)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.min_lr, c.optim.weight_decay) == (
        "lars", 4.8, "none", 0.0048, 1e-6)
    assert (c.optim.momentum, c.optim.trust_coefficient, c.optim.warmup_epochs) == (0.9, 0.001, 10)
    m = c.method
    assert (m.num_prototypes, m.proj_hidden_dim, m.proj_dim, m.temperature, m.epsilon, m.sinkhorn_iterations) == (
        3000, 2048, 128, 0.1, 0.05, 3)
    assert (m.num_local_crops, m.local_crop_size, list(m.global_crop_scale), list(m.local_crop_scale)) == (
        6, 96, [0.14, 1.0], [0.05, 0.14])
    assert (m.queue_length, m.freeze_prototypes_epochs, m.sync_bn) == (0, 1, True)
    assert round(1281167 / 4096) == 313                             # the official freeze is one epoch
    method = create_method(load_config(None, ["data.train=x", "method.name=swav", "model.name=resnet10t"]))
    assert [(v.size, v.crop_scale) for v in method.views] == [(None, (0.14, 1.0))] * 2 + [(96, (0.05, 0.14))] * 6


def test_fewer_prototypes_than_dimensions_is_warned(caplog):
    """100 prototypes in 128 dimensions collapsed at once on the digits (every embedding orthogonal to every
    prototype: uniform scores, loss ln K, no gradient): building such a SwAV says so."""
    import logging

    from pretrain.methods import create_method

    base = ["data.train=x", "model.name=resnet10t", "data.image_size=16", "method.name=swav", "method.proj_dim=16",
            "method.proj_hidden_dim=32", "method.local_crop_size=8"]
    with caplog.at_level(logging.WARNING, logger="pretrain.methods"):
        create_method(load_config(None, base + ["method.num_prototypes=16"]))
    assert "num_prototypes=16 is not above method.proj_dim=16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.methods"):
        create_method(load_config(None, base + ["method.num_prototypes=17"]))
    assert "num_prototypes" not in caplog.text
