"""The cross-rank proof for every method that claims it (`Method.cross_rank_exact`): W=2 ranks at local
batch B give the loss and every parameter gradient of one process at batch 2B on the same samples, under
DDP, under DeepSpeed ZeRO-2 and under FSDP2, with each method's own digits config (heads, BN, hyper-parameters).

This is where distributed bugs of these methods show: BN statistics per rank instead of global, a mean of
per-rank cross-correlation matrices instead of their sum, variance/covariance over local embeddings,
Sinkhorn marginals per rank, negatives from one rank only. Each rank runs the real backend; the reference
is plain autograd in this process."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from safetensors.torch import load_file

from helpers import SMALL_VIT, WORKERS, cli, tb_scalars, torchrun
from pretrain.engine.checkpoint import find_checkpoint
from pretrain.methods import METHODS
from pretrain.methods.momentum import MomentumMethod

sys.path.insert(0, str(WORKERS))
from rank_common import build, config_path, inputs  # noqa: E402

W, B = 2, 4
EXACT = [n for n in METHODS.names() if METHODS.get(n).cross_rank_exact]
#: methods whose objective is per rank by design, and why (anything else must claim cross_rank_exact)
PER_RANK = {
    "cpc": "its encoder's BatchNorm normalises each rank's patches (CPC has no sync_bn; CPC v2 uses layer norm)",
    "moco_v2": "shuffle BN normalises each GPU's keys on its own, and each rank's queue holds its own keys",
    "vae": "per-sample loss with random draws from each rank's own generator",
    "gan": "random latents per rank; two optimizer phases",
    "pixelcnn": "per-sample likelihood, no cross-sample term: exact, but nothing to prove",
    "ddpm": "random timesteps and noise per rank",
    "flow": "random times and noise per rank",
    "nnclr": "the nearest neighbour is an argmax: rounding can pick another one (fixed support set: tests/test_nnclr.py)",
    "finetune": "mixup/cutmix pair samples within each rank's batch (as MAE's per-GPU Mixup), and a ResNet's BN is per rank",
}


def test_every_embedding_method_claims_cross_rank_exactness():
    assert set(METHODS.names()) == set(EXACT) | set(PER_RANK)
    assert all(config_path(n).exists() for n in EXACT)


@pytest.fixture(scope="module", params=["ddp", "zero2", "fsdp"])
def ranks(request, tmp_path_factory):
    """One torchrun of W ranks over every exact method (2 launches in all, not one per method)."""
    d = tmp_path_factory.mktemp(f"ranks_{request.param}")
    names = os.environ.get("RANK_TEST_METHODS", " ".join(EXACT)).split()   # a subset while working on one method
    data = {n: inputs(build(n)[1], W * B, seed=1) for n in names}
    torch.save(data, d / "inputs.pt")
    torchrun(WORKERS / "method_ranks.py", request.param, d / "inputs.pt", d / "out.pt", *names, timeout=900,
             check=True)
    return data, torch.load(d / "out.pt"), request.param


def _close(got, want, name, rel=2e-4):
    """Equal up to float32 summation order: atol relative to the tensor's scale."""
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_equal_one_process_with_the_whole_batch(ranks, name):
    data, res, backend = ranks
    if name not in res:
        pytest.skip("not in RANK_TEST_METHODS")
    _, method = build(name)
    method.before_step(method.step_context(10, 20, 5))   # as the ranks: past any warm-up freeze, so every parameter has a gradient
    loss = method(data[name])["loss"]
    loss.backward()
    got = res[name]
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    # tensors of extra_state the step updated (DINO/iBOT's centres: all-reduced, so the 2-rank centre is the big batch's)
    extra = {k: v for k, v in method.extra_state().items() if torch.is_tensor(v)}
    assert set(got["extra"]) == set(extra)
    for k, v in extra.items():
        _close(got["extra"][k], v, f"{backend} {name} extra_state[{k}]")
    want = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(want)
    for n, g in want.items():
        if g is None:   # unused this step (e.g. frozen by the method): no gradient on either side
            assert got["grads"][n] is None or not got["grads"][n].any(), n
            continue
        _close(got["grads"][n], g, f"{backend} {name} {n}")
    # the comparison has teeth: per-rank BN statistics give another loss, where the method has BN
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        assert abs(got["plain_loss"].item() - loss.item()) > 1e-4 * max(1.0, abs(loss.item()))


# ------------------------------------------------------------------------------------------- EMA targets, ZeRO-3, FSDP2
#: every momentum-encoder method but MoCo v2 (tests/test_deepspeed.py proves its key encoder; its queue
#: and shuffle BN make its runs per rank)
MOMENTUM = [n for n in EXACT if issubclass(METHODS.get(n), MomentumMethod)]


_RUNS = {}   # (method, backend) -> run dir: the DDP reference is trained once for both sharded backends


def _train(tmp_path_factory, shards, name, backend):
    if (name, backend) in _RUNS:
        return _RUNS[name, backend]
    run_dir = _RUNS[name, backend] = tmp_path_factory.mktemp(f"ema_{name}_{backend}") / "run"
    model = dict(a.split("=", 1) for a in SMALL_VIT) if build(name)[0].model.name.startswith("vit") else {
        "model.name": "resnet10t"}
    ov = {"data.train": f"{shards}/train", "data.val": "null", "run_dir": run_dir, **model,
          "data.image_size": 16, "train.global_batch_size": 16, "train.max_steps": 3, "data.num_workers": 0,
          "data.shuffle_buffer": 64, "log.every_steps": 1, "log.progress": "false", "train.channels_last": "false",
          "optim.name": "sgd", "optim.warmup_steps": 1, "method.momentum": 0.5,
          "train.backend": {"zero3": "deepspeed"}.get(backend, backend), "deepspeed.zero_stage": 3}
    torchrun("-m", "pretrain.cli", "train", config_path(name), *[f"{k}={v}" for k, v in ov.items()], timeout=600,
             check=True)
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sharded", ["zero3", "fsdp"])
@pytest.mark.parametrize("name", MOMENTUM)
def test_ema_target_sharded_equals_ddp(tmp_path_factory, tmp_path, digits_shards, name, sharded):
    """The EMA target is partitioned like the online network (ZeRO-3's partitions, FSDP2's DTensor shards)
    and updated slice by slice on each rank: after 3 steps from the same start (m = 0.5, so it moves), its
    weights exported with --which key equal the DDP run's, and so do the losses at every step."""
    ddp, z3 = (_train(tmp_path_factory, digits_shards, name, b) for b in ("ddp", sharded))
    want, got = tb_scalars(ddp), tb_scalars(z3)
    assert sorted(got) == [1, 2, 3] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in got), (got, want)
    ref = torch.load(find_checkpoint(ddp), map_location="cpu", weights_only=True)["model"]
    out = tmp_path / "key.safetensors"
    cli("export", z3, "--out", out, "--which", "key", check=True)
    exported = load_file(str(out))
    key = {k[len("key_backbone."):]: v for k, v in ref.items() if k.startswith("key_backbone.")}
    assert set(exported) == set(key)
    for k in exported:
        torch.testing.assert_close(exported[k], key[k], rtol=1e-4, atol=1e-5, msg=k)
    # the target did move, and is not the online network
    moved = [k for k, v in key.items() if "running" not in k and v.is_floating_point()
             and not torch.equal(v, ref["backbone." + k])]
    assert moved
