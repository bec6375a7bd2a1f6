"""DINO / iBOT / DINOv2 losses and DINOHead: every function against a float64 numpy reference written here
(loops and closed-form gradients, not the torch code), the fp16 overflow that makes a naive DINO loss NaN,
and 2 real processes (tests/workers/dino_losses_ranks.py) for the centre, Sinkhorn and KoLeo over the
global batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import WORKERS, torchrun
from pretrain.losses.dino import (dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_teacher, teacher_probs,
                                  update_center)
from pretrain.losses.sinkhorn import sinkhorn
from pretrain.models import DINOHead


# ------------------------------------------------------------------------------------------------ references
def np64(t):
    return t.detach().double().numpy()


def ref_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ref_log_softmax(z):
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def ref_logsumexp(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def ref_sinkhorn(logits, temp, iterations):
    """Sinkhorn-Knopp in the log domain (overflow-free), logits [N, K] -> codes [N, K], rows summing to 1:
    Q = exp(logits / temp)^T / total, then `iterations` x (rows to 1/K, columns to 1/N), then columns x N."""
    N, K = logits.shape
    L = logits.T / temp                                                  # [K, N]
    L = L - ref_logsumexp(L.reshape(-1), 0)
    for _ in range(iterations):
        L = L - ref_logsumexp(L, 1) - np.log(K)
        L = L - ref_logsumexp(L, 0) - np.log(N)
    return np.exp(L + np.log(N)).T


def ref_dino(s, p, Ts):
    """(loss, d loss / d s) for s [Vs, B, K], p [Vt, B, K]: pairs it != iv, each mean_b -sum_k p log q."""
    Vs, B, _ = s.shape
    q = ref_softmax(s / Ts)
    lq = ref_log_softmax(s / Ts)
    pairs = [(it, iv) for it in range(p.shape[0]) for iv in range(Vs) if it != iv]
    loss, grad = 0.0, np.zeros_like(s)
    for it, iv in pairs:
        loss += sum(-(p[it, b] * lq[iv, b]).sum() for b in range(B)) / B
        grad[iv] += (q[iv] - p[it]) / (Ts * B)                          # d/ds of -sum p log softmax(s/T)
    return loss / len(pairs), grad / len(pairs)


def ref_ibot(s, p, masks, Ts):
    """(loss, grad) of iBOT's patch loss: per (view, image) sum over masked patches / max(#masked, 1),
    then the mean over images and views."""
    V, B, N, _ = s.shape
    q, lq = ref_softmax(s / Ts), ref_log_softmax(s / Ts)
    loss, grad = 0.0, np.zeros_like(s)
    for v in range(V):
        for b in range(B):
            count = max(int(masks[v, b].sum()), 1)
            for n in range(N):
                if masks[v, b, n]:
                    loss += -(p[v, b, n] * lq[v, b, n]).sum() / count / (V * B)
                    grad[v, b, n] = (q[v, b, n] - p[v, b, n]) / Ts / count / (V * B)
    return loss, grad


def ref_koleo(x, eps=1e-8):
    """(loss, d loss / d x) for x [n, D]: u = x / |x|, j(i) = argmax_{j != i} u_i.u_j, d_i = |u_i - u_j(i)|,
    loss = -mean_i log(d_i + eps)."""
    n = x.shape[0]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / norms
    gu = np.zeros_like(u)
    loss = 0.0
    for i in range(n):
        j = max((k for k in range(n) if k != i), key=lambda k: u[i] @ u[k])
        diff = u[i] - u[j]
        d = np.linalg.norm(diff)
        loss += -np.log(d + eps) / n
        g = -diff / (d * (d + eps)) / n                                  # d/du_i of -log(d + eps) / n
        gu[i] += g
        gu[j] -= g
    gx = np.stack([(gu[i] - u[i] * (u[i] @ gu[i])) / norms[i, 0] for i in range(n)])   # through u = x / |x|
    return loss, gx


# ------------------------------------------------------------------------------------------------ the losses
def test_teacher_probs_and_center_match_reference():
    g = torch.Generator().manual_seed(0)
    t, c = torch.randn(2, 5, 11, generator=g), torch.randn(1, 11, generator=g)
    np.testing.assert_allclose(np64(teacher_probs(t, c, 0.04)), ref_softmax((np64(t) - np64(c)) / 0.04), atol=1e-6)
    new = update_center(c, t, 0.9)
    np.testing.assert_allclose(np64(new), 0.9 * np64(c) + 0.1 * np64(t).reshape(-1, 11).mean(0), atol=1e-6)
    assert new.shape == (1, 11) and not torch.equal(new, c)
    # iBOT's patch centre [1, 1, K]: the mean over views, images and patches
    tp, cp = torch.randn(2, 3, 4, 11, generator=g), torch.zeros(1, 1, 11)
    np.testing.assert_allclose(np64(update_center(cp, tp, 0.9)), 0.1 * np64(tp).reshape(-1, 11).mean(0)[None, None],
                               atol=1e-6)


@pytest.mark.parametrize("Vt,Vs", [(2, 2), (2, 6), (1, 3)])
def test_dino_loss_value_and_gradient(Vt, Vs):
    g = torch.Generator().manual_seed(Vs)
    s = torch.randn(Vs, 4, 9, generator=g).requires_grad_(True)
    p = teacher_probs(torch.randn(Vt, 4, 9, generator=g), torch.zeros(1, 9), 0.05)
    loss = dino_loss(s, p, 0.1)
    loss.backward()
    want, grad = ref_dino(np64(s), np64(p), 0.1)
    assert abs(loss.item() - want) < 1e-5 * max(1, abs(want))
    np.testing.assert_allclose(np64(s.grad), grad, atol=1e-6)


def test_dino_loss_rejects_shapes_without_pairs():
    with pytest.raises(ValueError, match="at least one pair"):
        dino_loss(torch.randn(1, 2, 3), torch.rand(1, 2, 3), 0.1)
    with pytest.raises(ValueError, match="Vt <= Vs"):
        dino_loss(torch.randn(2, 2, 3), torch.rand(3, 2, 3), 0.1)


def test_ibot_patch_loss_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    V, B, N, K = 2, 3, 5, 7
    s = torch.randn(V, B, N, K, generator=g).requires_grad_(True)
    p = teacher_probs(torch.randn(V, B, N, K, generator=g), torch.zeros(1, 1, K), 0.07)
    masks = torch.rand(V, B, N, generator=g) < 0.5
    masks[0, 1] = False                                                  # an image with nothing masked: adds 0, counts
    masks[1, 2] = True
    loss = ibot_patch_loss(s, p, masks, 0.1)
    loss.backward()
    want, grad = ref_ibot(np64(s), np64(p), masks.numpy(), 0.1)
    assert abs(loss.item() - want) < 1e-5 * max(1, abs(want))
    np.testing.assert_allclose(np64(s.grad), grad, atol=1e-6)


def test_sinkhorn_teacher_is_sinkhorn_for_any_logits():
    """Equal to the log-domain reference for cosine logits and for logits far above 1 (a head without
    norm_last_layer), where the shared `sinkhorn` alone overflows: its exp((scores - 1) / eps) assumes
    scores <= ~1."""
    g = torch.Generator().manual_seed(2)
    for scale in (1.0, 40.0):
        t = (torch.rand(2, 6, 10, generator=g) * 2 - 1) * scale           # [Vt, B, K]
        got = sinkhorn_teacher(t, 0.04, 3)
        want = ref_sinkhorn(np64(t).reshape(12, 10), 0.04, 3).reshape(2, 6, 10)
        np.testing.assert_allclose(np64(got), want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np64(got).sum(-1), 1, atol=1e-5)
    assert not torch.isfinite(sinkhorn(t.reshape(12, 10), 0.04, 3)).all()   # the unshifted call, same logits


def test_koleo_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g).requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    want, grad = ref_koleo(np64(x))
    assert abs(loss.item() - want) < 1e-5
    np.testing.assert_allclose(np64(x.grad), grad, atol=1e-5)


# ------------------------------------------------------------------------------------------------ fp16
def test_fp16_logits_overflow_the_naive_loss_but_not_ours():
    """DINO's NaN loss in fp16 (facebookresearch/dino issue #58, cured there by fp32). Two legitimate fp16
    inputs: (a) cosine logits |t| <= 1 at K = 65536 through the textbook softmax exp(t / 0.04) / sum
    (exp(25) > 65504); (b) the logits of a head without norm_last_layer (|t| in the thousands) divided by
    the temperature in fp16 (t / 0.04 > 65504 from |t| > 2620): torch's own softmax/log_softmax give NaN.
    Ours upcast first: finite and equal to float64 on the same fp16 values."""
    g = torch.Generator().manual_seed(4)
    # (a)
    t = ((torch.rand(2, 2, 65536, generator=g) * 2 - 1)).half()
    s = ((torch.rand(3, 2, 65536, generator=g) * 2 - 1)).half()
    e = torch.exp(t / 0.04)
    assert not torch.isfinite(e / e.sum(-1, keepdim=True)).all()
    # (b)
    tb = ((torch.rand(2, 2, 64, generator=g) * 2 - 1) * 3000).half()
    sb = ((torch.rand(3, 2, 64, generator=g) * 2 - 1) * 8000).half()
    assert not torch.isfinite(F.softmax(tb / 0.04, dim=-1)).all()
    assert not torch.isfinite(F.log_softmax(sb / 0.1, dim=-1)).all()
    for t, s in ((t, s), (tb, sb)):
        K = t.shape[-1]
        c = torch.zeros(1, K, dtype=torch.half)
        p = teacher_probs(t, c, 0.04)
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        np.testing.assert_allclose(np64(p), ref_softmax(np64(t) / 0.04), atol=1e-6)
        s = s.clone().requires_grad_(True)
        loss = dino_loss(s, p, 0.1)
        loss.backward()
        want, grad = ref_dino(np64(s), np64(p), 0.1)
        assert torch.isfinite(loss) and abs(loss.item() - want) < 1e-4 * max(1, abs(want))
        assert torch.isfinite(s.grad).all()
        np.testing.assert_allclose(np64(s.grad), grad, atol=1e-6)
        np.testing.assert_allclose(np64(update_center(c, t)), 0.1 * np64(t).reshape(-1, K).mean(0)[None], rtol=1e-5,
                                   atol=1e-4)
        sk = sinkhorn_teacher(t, 0.04)
        assert torch.isfinite(sk).all()
        np.testing.assert_allclose(np64(sk), ref_sinkhorn(np64(t).reshape(-1, K), 0.04, 3).reshape(t.shape),
                                   rtol=1e-3, atol=1e-6)
    xb = (torch.randn(6, 8, generator=g) * 1000).half()
    assert abs(koleo_loss(xb).item() - ref_koleo(np64(xb))[0]) < 1e-4


# ------------------------------------------------------------------------------------------------ the head
def _head(**kw):
    torch.manual_seed(0)
    return DINOHead(16, out_dim=64, hidden_dim=32, bottleneck_dim=16, **kw)


def test_dino_head_structure_and_weight_norm():
    h = _head()
    names = dict(h.named_parameters())
    assert names["last_layer.weight_v"].shape == (64, 16) and names["last_layer.weight_g"].shape == (64, 1)
    assert torch.equal(names["last_layer.weight_g"], torch.ones(64, 1)) and not names["last_layer.weight_g"].requires_grad
    assert h.last_layer_params() == [names["last_layer.weight_v"]]
    assert [type(m).__name__ for m in h.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert all(torch.count_nonzero(m.bias) == 0 for m in h.mlp if isinstance(m, torch.nn.Linear))
    assert 0.015 < h.mlp[0].weight.std().item() < 0.025
    free = _head(norm_last_layer=False, use_bn=True, num_layers=2)
    assert len(free.last_layer_params()) == 2 and isinstance(free.mlp[1], torch.nn.BatchNorm1d)
    # forward and gradients equal torch's own weight_norm on the same v and g (g trained: != 1)
    with torch.no_grad():
        free.last_layer.weight_g.uniform_(0.5, 2)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 64, bias=False))
    ref_g, ref_v = ref.parametrizations.weight.original0, ref.parametrizations.weight.original1
    with torch.no_grad():
        ref_v.copy_(free.last_layer.weight_v)
        ref_g.copy_(free.last_layer.weight_g)
    x = torch.randn(5, 16)
    z = F.normalize(free.mlp(x), dim=-1)
    out = free(x)
    torch.testing.assert_close(out, ref(z))
    out.square().sum().backward()
    ref(z.detach()).square().sum().backward()
    torch.testing.assert_close(free.last_layer.weight_v.grad, ref_v.grad)
    torch.testing.assert_close(free.last_layer.weight_g.grad, ref_g.grad)
    assert _head()(x).abs().max() <= 1 + 1e-6                            # norm_last_layer: cosines


def test_dino_head_bf16_autocast_and_fp16_weights_match_fp32():
    h = _head()
    with torch.no_grad():
        h.last_layer.weight_v.mul_(40000 / h.last_layer.weight_v.abs().max())   # large v (||v|| grows in training)
    x = torch.randn(4, 16)
    want = h(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = h(x)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    v16 = h.last_layer.weight_v.detach().half()
    assert not torch.isfinite(v16.norm(dim=1)).all()                    # the row norm in fp16 overflows
    h16 = _head().half()
    h16.load_state_dict(h.state_dict())
    got16 = h16(x.half())
    assert got16.dtype == torch.float16 and torch.isfinite(got16).all()
    torch.testing.assert_close(got16.float(), want, atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------------------ 2 ranks
W, B, D, K, VT = 2, 3, 8, 16, 2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    inputs = {"teacher": torch.randn(VT, W * B, K, generator=g), "center": torch.randn(1, K, generator=g),
              "z": torch.randn(W * B, D, generator=g), "lin": torch.randn(D, D, generator=g) / D ** 0.5}
    d = tmp_path_factory.mktemp("dino")
    torch.save(inputs, d / "inputs.pt")
    torchrun(WORKERS / "dino_losses_ranks.py", d / "inputs.pt", d / "out.pt", timeout=200, check=True)
    return inputs, torch.load(d / "out.pt", weights_only=False)


@pytest.mark.slow
def test_center_over_ranks_equals_one_process(two_ranks):
    inputs, out = two_ranks
    want = 0.9 * np64(inputs["center"]) + 0.1 * np64(inputs["teacher"]).reshape(-1, K).mean(0)
    for part in out["center"]:
        np.testing.assert_allclose(np64(part), want, atol=1e-6)
    # without the all-reduce each rank centres on its own half: a different centre
    assert all(np.abs(np64(part) - want).max() > 1e-2 for part in out["center_no_reduce"])


@pytest.mark.slow
def test_sinkhorn_over_ranks_equals_one_process(two_ranks):
    inputs, out = two_ranks
    for scale, key in ((1, "sinkhorn"), (40, "sinkhorn_large")):
        t = np64(inputs["teacher"]) * scale                                     # [Vt, W*B, K]
        flat = np.concatenate([t[:, r * B:(r + 1) * B].reshape(-1, K) for r in range(W)])   # rank 0's rows, rank 1's
        want = ref_sinkhorn(flat, 0.04, 3)
        got = np.concatenate([np64(p).reshape(-1, K) for p in out[key]])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # each rank shifting by its own per-prototype maximum (no MAX all-reduce) is another answer
    got = np.concatenate([np64(p).reshape(-1, K) for p in out["sinkhorn_large_local_max"]])
    assert np.abs(got - want).max() > 1e-2


@pytest.mark.slow
def test_koleo_over_ranks_equals_one_process_value_and_gradient(two_ranks):
    """Rank r: x_r = z_r @ lin, loss_r = koleo_loss(x_r). The mean of the ranks' losses is the one-process
    loss of all W*B rows; DDP's mean of lin's gradients is its gradient; x_r.grad is W x d loss / d x_r."""
    inputs, out = two_ranks
    x = np64(inputs["z"]) @ np64(inputs["lin"])
    want, gx = ref_koleo(x)
    k = out["koleo"]
    assert abs(np.mean([p["loss"].item() for p in k]) - want) < 1e-5
    np.testing.assert_allclose(np.concatenate([np64(p["x_grad"]) for p in k]) / W, gx, atol=1e-5)
    np.testing.assert_allclose(np.mean([np64(p["lin_grad"]) for p in k], 0), np64(inputs["z"]).T @ gx, atol=1e-5)
    # teeth: neighbours only among a rank's own rows, or a gather whose backward drops the other ranks' terms
    assert abs(np.mean([p["loss"].item() for p in out["koleo_local"]]) - want) > 1e-3
    assert np.abs(np.mean([np64(p["lin_grad"]) for p in out["koleo_no_grad_sum"]], 0)
                  - np64(inputs["z"]).T @ gx).max() > 1e-3
