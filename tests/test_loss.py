"""NT-Xent against a reference written here, and the distributed proof: W ranks x batch B (DDP,
global BN, gathered negatives) == 1 process x batch W*B, in loss and in every parameter gradient."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import WORKERS, torchrun
from pretrain.losses import info_nce, nt_xent

sys.path.insert(0, str(WORKERS))
from grad_common import build_method  # noqa: E402


def reference_nt_xent(z1, z2, t):
    """SimCLR's loss, written out anchor by anchor: 2N anchors, each with one positive (its other
    view) and every other embedding in the batch as a negative."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        total += -(float(z[i] @ z[pos]) / t - math.log(denom))
    return total / (2 * n)


@pytest.mark.parametrize("n, d, t", [(1, 3, 0.5), (5, 8, 0.2), (16, 32, 0.07)])
def test_nt_xent_matches_reference(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5, abs=1e-6)


def test_nt_xent_positive_pairs_lower_the_loss():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=g)
    aligned = nt_xent(z1, z1 + 0.01 * torch.randn(8, 16, generator=g), 0.1)
    shuffled = nt_xent(z1, z1[torch.randperm(8, generator=g)], 0.1)
    assert aligned < shuffled


@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory):
    """Run tests/workers/simclr_grads.py on 2 ranks over a fixed global batch of 2 x 6 samples."""
    d = tmp_path_factory.mktemp("proof")
    g = torch.Generator().manual_seed(1)
    W, B = 2, 6
    inputs = {
        "views": torch.randn(2, W * B, 3, 16, 16, generator=g),
        "z1": torch.randn(W * B, 16, generator=g), "z2": torch.randn(W * B, 16, generator=g),
        "bn_x": torch.randn(W * B, 4, 5, 5, generator=g) * 3 + 1, "bn_c": torch.randn(W * B, 4, 5, 5, generator=g),
        "bn_w": torch.rand(4, generator=g) + 0.5, "bn_b": torch.randn(4, generator=g),
    }
    torch.save(inputs, d / "inputs.pt")
    torchrun(WORKERS / "simclr_grads.py", d / "inputs.pt", d / "out.pt", timeout=200, check=True)
    return inputs, torch.load(d / "out.pt"), W


def _close(got, want, rel=1e-4):
    """Equal up to float32 summation order: atol relative to the tensor's scale."""
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


def test_ddp_global_batch_equals_single_process(two_rank_result):
    inputs, res, W = two_rank_result
    method = build_method()
    loss = method({"views": [inputs["views"]]})["loss"]
    loss.backward()
    assert res["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    grads = dict(method.named_parameters())
    assert set(res["grads"]) == set(grads)
    for name, p in grads.items():
        _close(res["grads"][name], p.grad)
    # global BN also keeps the same running statistics
    for name, b in method.named_buffers():
        if b.is_floating_point():
            _close(res["buffers"][name], b)

    # the comparison has teeth: per-rank BN statistics (what plain BN under DDP does) give another loss
    per_rank = build_method()
    B = inputs["views"].shape[1] // W
    local = [per_rank({"views": [inputs["views"][:, r * B:(r + 1) * B]]})["loss"].item() for r in range(W)]
    assert abs(sum(local) / W - loss.item()) > 1e-3


def test_nt_xent_two_ranks_equals_one(two_rank_result):
    inputs, res, W = two_rank_result
    z1 = inputs["z1"].clone().requires_grad_(True)
    z2 = inputs["z2"].clone().requires_grad_(True)
    loss = nt_xent(z1, z2, 0.3)
    # DDP averages over ranks: the objective is the mean of the per-rank losses
    (loss * W).backward()   # each rank's gradient is d(sum_r L_r)/dz, the un-averaged global one
    parts = res["nt_xent"]
    assert torch.stack([p[0] for p in parts]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    _close(torch.cat([p[1] for p in parts]), z1.grad)
    _close(torch.cat([p[2] for p in parts]), z2.grad)


@pytest.mark.parametrize("with_grad", [True, False])
def test_info_nce_two_ranks_equals_one(two_rank_result, with_grad):
    """Keys from all ranks are the negatives: 2 x N equals one process with 2N, gradients included
    (through the keys too when they are gathered with gradients, as CPC's targets are)."""
    inputs, res, W = two_rank_result
    q = inputs["z1"].clone().requires_grad_(True)
    k = inputs["z2"].clone().requires_grad_(True)
    loss = info_nce(q, k, 0.3, grad_through_keys=with_grad)
    (loss * W).backward()
    parts = res[f"info_nce_{with_grad}"]
    assert torch.stack([p[0] for p in parts]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    _close(torch.cat([p[1] for p in parts]), q.grad)
    if with_grad:
        _close(torch.cat([p[2] for p in parts]), k.grad)
    # and it is not the per-rank loss: negatives from the other rank matter
    N = q.shape[0] // W
    local = [info_nce(q[r * N:(r + 1) * N].detach(), k[r * N:(r + 1) * N].detach(), 0.3).item() for r in range(W)]
    assert abs(sum(local) / W - loss.item()) > 1e-3


def test_global_batch_norm_two_ranks_equals_full_batch(two_rank_result):
    inputs, res, W = two_rank_result
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(inputs["bn_w"]), bn.bias.copy_(inputs["bn_b"])
    x = inputs["bn_x"].clone().requires_grad_(True)
    y = bn(x)
    (y * inputs["bn_c"]).sum().backward()
    got = res["bn"]
    _close(torch.cat([p[0] for p in got["parts"]]), y.detach())
    _close(torch.cat([p[1] for p in got["parts"]]), x.grad)
    _close(got["dw"], bn.weight.grad)
    _close(got["db"], bn.bias.grad)
    _close(got["running_mean"], bn.running_mean)
    _close(got["running_var"], bn.running_var)


def test_fp32_batch_norm_matches_batch_norm_and_takes_half_precision_weights():
    """What DeepSpeed bf16 runs use for every BN: the same maths as nn.BatchNorm2d, computed in fp32,
    also when the weights are bf16 and the running statistics fp32 (which nn.BatchNorm2d rejects)."""
    from pretrain.models import convert_to_fp32_bn

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5), ref[0].bias.uniform_(-1, 1)
    ours = convert_to_fp32_bn(__import__("copy").deepcopy(ref))
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        _close(ours(x), ref(x), rel=1e-5)
    _close(ours[0].running_mean, ref[0].running_mean, rel=1e-6)
    _close(ours[0].running_var, ref[0].running_var, rel=1e-6)
    ours.train()
    ours[0].weight.data, ours[0].bias.data = ours[0].weight.data.bfloat16(), ours[0].bias.data.bfloat16()
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ours[0].running_mean.dtype == torch.float32
    with pytest.raises(RuntimeError):   # the failure Fp32BatchNorm exists to avoid
        bad = torch.nn.BatchNorm2d(4)
        bad.weight.data, bad.bias.data = bad.weight.data.bfloat16(), bad.bias.data.bfloat16()
        bad(x.bfloat16())


def test_global_bn_conversion_keeps_frozen_parameters_frozen():
    """A momentum encoder's BN (requires_grad=False) stays frozen when converted to global BN: otherwise its
    parameters reach the optimizer and DDP waits for gradients they never get (MoCo v3 / BYOL at W > 1)."""
    from pretrain.models import convert_sync_bn

    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    for p in frozen.parameters():
        p.requires_grad_(False)
    live = torch.nn.BatchNorm1d(3)
    model = convert_sync_bn(torch.nn.ModuleDict({"key": frozen, "online": live}), torch.device("cpu"))
    assert not any(p.requires_grad for p in model["key"].parameters())
    assert all(p.requires_grad for p in model["online"].parameters())
