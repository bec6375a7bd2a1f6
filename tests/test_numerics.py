"""Numerics against independent float64 references: the discretized likelihoods (mpmath at 40 digits)
and batch norm (Fp32BatchNorm with momentum=None, GlobalBatchNorm's variance at a large mean offset,
in one process and on 2 gloo ranks)."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

from pretrain.losses.likelihood import discretized_log_prob

EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------ likelihood
def _likelihood_grid():
    """Every 8-bit level x log scales -7..3 x offsets x - mean of 0 to 50 scales, both signs (float32)."""
    levels = torch.arange(256).float() / 127.5 - 1
    log_scales = torch.tensor([-7.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0])
    offsets = torch.tensor([0.0, 0.3, -0.3, 1.0, -1.0, 4.0, -4.0, 15.0, -15.0, 50.0, -50.0])
    x, ls, off = (t.reshape(-1) for t in torch.meshgrid(levels, log_scales, offsets, indexing="ij"))
    return x, x - off * ls.exp(), ls


def _reference(x, mean, log_scale, kind):
    """float64 [5, N]: log P(level), d/dmean, d/dlog_scale and the size of the two terms whose difference
    each derivative is (to tell a zero from cancellation), from the float32 inputs' exact values in mpmath.
    P = F(a) - F(b) for the bin [x - 1/255, x + 1/255] in standard units (a, b), the edge bins open; the
    difference is taken on the side of the bin nearer the mode (F(-b) - F(-a) above it) so that 40 digits
    always suffice. Derivatives: da/dmean = -1/s, da/dlog_scale = -a (same for b)."""
    mpmath.mp.dps = 40
    if kind == "logistic":
        cdf = lambda z: 1 / (1 + mpmath.exp(-z))                                    # noqa: E731
        pdf = lambda z: cdf(z) * cdf(-z)                                            # noqa: E731
    else:
        cdf, pdf = mpmath.ncdf, mpmath.npdf
    out = []
    for xi, mi, li in zip(x.tolist(), mean.tolist(), log_scale.tolist()):
        s, half = mpmath.exp(mpmath.mpf(li)), mpmath.mpf(1) / 255
        a, b = (mpmath.mpf(xi) - mpmath.mpf(mi) + half) / s, (mpmath.mpf(xi) - mpmath.mpf(mi) - half) / s
        k = round((xi + 1) * 127.5)
        if k == 0:
            p, fa, fb = cdf(a), pdf(a), 0
        elif k == 255:
            p, fa, fb = cdf(-b), 0, pdf(b)
        else:
            p, fa, fb = (cdf(a) - cdf(b) if a + b <= 0 else cdf(-b) - cdf(-a)), pdf(a), pdf(b)
        out.append((float(mpmath.log(p)), float(-(fa - fb) / (s * p)), float(-(a * fa - b * fb) / p),
                    float((fa + fb) / (s * p)), float((abs(a) * fa + abs(b) * fb) / p)))
    return torch.tensor(out, dtype=torch.float64).T


@pytest.fixture(scope="module")
def likelihood_reference():
    x, mean, log_scale = _likelihood_grid()
    return (x, mean, log_scale), {kind: _reference(x, mean, log_scale, kind) for kind in ("logistic", "gaussian")}


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretized_likelihood_matches_float64_reference_in_the_tails(likelihood_reference, kind):
    """Within 1e-4 nats of the 40-digit value on the whole grid (|x - mean| up to 50 scales, log scales
    -7..3, every level). Where |log p| > 200 (the Gaussian 20+ scales out: -1254 nats at 50) the bound is
    4 float32 ulps of the value instead, as float32 cannot hold -1254 closer than 6e-5. The old
    log(clamp(sigmoid(hi) - sigmoid(lo), 1e-12)) was 30 nats off for a logistic pixel 50 scales above its mean."""
    (x, mean, log_scale), ref = likelihood_reference
    want = ref[kind][0]
    got = discretized_log_prob(x, mean, log_scale, kind).double()
    err = (got - want).abs()
    bound = (4 * EPS32 * want.abs()).clamp(min=1e-4)
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"{(err > bound).sum()} of {err.numel()} values off; worst: x={x[worst]:.4f} "
                                  f"mean={mean[worst]:.5g} log_scale={log_scale[worst]} got {got[worst]:.6f} "
                                  f"want {want[worst]:.6f}")


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretized_likelihood_gradients_match_float64_reference(likelihood_reference, kind):
    """d log p / d mean and d log p / d log_scale: finite, within 1e-4 relative (absolute below 1) of the
    reference, and non-zero wherever the reference's is (a normal float32, and not the 1e-6-relative remnant
    of two cancelling terms, e.g. d/dlog_scale = z^2 - 1 = 1e-8 at z = 1). The old clamp gave zero
    gradients for pixels well above (or below) the mean, exactly where the model most needs one."""
    (x, mean, log_scale), ref = likelihood_reference
    mean, log_scale = mean.clone().requires_grad_(True), log_scale.clone().requires_grad_(True)
    discretized_log_prob(x, mean, log_scale, kind).sum().backward()
    for name, got, want, terms in (("mean", mean.grad, ref[kind][1], ref[kind][3]),
                                   ("log_scale", log_scale.grad, ref[kind][2], ref[kind][4])):
        assert got.isfinite().all(), name
        lost = (got == 0) & (want.abs() > torch.finfo(torch.float32).tiny) & (want.abs() > 1e-6 * terms)
        assert not lost.any(), f"d/d{name} is 0 at {lost.sum()} points where the reference's is not"
        err = (got.double() - want).abs() / want.abs().clamp(min=1)
        worst = err.argmax()
        assert err.max() <= 1e-4, (f"d/d{name}: x={x[worst]:.4f} mean={mean[worst]:.5g} log_scale="
                                   f"{log_scale[worst]} got {got[worst]:.6g} want {want[worst]:.6g}")


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretized_likelihood_stays_finite_and_normalised_far_out(kind):
    """Means far outside [-1, 1] (z up to 1e9), scales far below the -7 clamp and up to e^200: the 256
    probabilities still sum to one, values and gradients stay finite (no NaN from a masked branch)."""
    levels = torch.arange(256).float() / 127.5 - 1
    for mu in (1e6, -1e6, 1e3, -5.0, 0.3):
        for ls in (-20.0, -7.0, 0.0, 10.0, 90.0, 200.0):
            mean, log_scale = torch.full((256,), mu, requires_grad=True), torch.full((256,), ls, requires_grad=True)
            lp = discretized_log_prob(levels, mean, log_scale, kind)
            lp.sum().backward()
            assert lp.isfinite().all() and mean.grad.isfinite().all() and log_scale.grad.isfinite().all(), (mu, ls)
            assert torch.logsumexp(lp.double(), 0).item() == pytest.approx(0.0, abs=1e-5), (mu, ls)


# ------------------------------------------------------------------------------------------------ batch norm
def _bn_pair(cls, C=4, **kw):
    """(ours: cls in float32, ref: torch.nn.BatchNorm2d in float64) with the same random affine weights."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(C, **kw).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    ours = cls(C, **kw)
    ours.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    return ours, ref


def _close64(got, want, rel=1e-5):
    """float32 result against a float64 reference: atol relative to the reference's scale."""
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("cls", ["Fp32BatchNorm", "GlobalBatchNorm"])
def test_batch_norm_cumulative_average_momentum_none_matches_torch(cls):
    """momentum=None (running stats = cumulative average): eval before any training step (old code: 1/0
    from num_batches_tracked = 0, though the factor is unused in eval), three train steps, eval again:
    outputs, running stats and counter equal float64 torch.nn.BatchNorm2d(momentum=None)."""
    import pretrain.models as models

    ours, ref = _bn_pair(getattr(models, cls), momentum=None)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 4, 3, 3, generator=g) * (i + 1) + i for i in range(4)]
    ours.eval(), ref.eval()
    _close64(ours(xs[0]), ref(xs[0].double()))
    ours.train(), ref.train()
    for x in xs[1:]:
        _close64(ours(x), ref(x.double()))
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    _close64(ours.running_mean, ref.running_mean), _close64(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    _close64(ours(xs[0]), ref(xs[0].double()))


def _offset_batch(n=12, C=3, seed=2):
    """float32 [n, C, 4, 4] with mean 1e3 and std 1 (plus a per-channel shift), and the rest of a BN check."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, C, 4, 4, generator=g) + 1e3 + torch.arange(C).float().view(1, C, 1, 1),
            "c": torch.randn(n, C, 4, 4, generator=g), "w": torch.rand(C, generator=g) + 0.5,
            "b": torch.randn(C, generator=g)}


def _bn_reference(inp):
    """float64 torch.nn.BatchNorm2d over the whole batch: output, input/affine grads of sum(y * c), running stats."""
    bn = torch.nn.BatchNorm2d(inp["w"].numel()).double()
    with torch.no_grad():
        bn.weight.copy_(inp["w"]), bn.bias.copy_(inp["b"])
    x = inp["x"].double().requires_grad_(True)
    y = bn(x)
    (y * inp["c"].double()).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


# float32 at a mean of 1e3 resolves 6e-5: what is left after normalising to std 1. The old E[x^2] - E[x]^2
# (E[x^2] ~ 1e6 with ulp 0.06) is off by ~1e-2 in the variance.
BN_TOL = {"y": 1e-4, "dx": 1e-4, "dw": 1e-4, "db": 1e-5, "running_mean": 1e-6, "running_var": 1e-5}


def _check_bn(got, want):
    for k, rel in BN_TOL.items():
        _close64(got[k], want[k], rel=rel)


def test_global_batch_norm_large_mean_one_process():
    """One process: GlobalBatchNorm (the local fp32 path) equals float64 BatchNorm at mean 1e3."""
    from pretrain.models import GlobalBatchNorm

    inp = _offset_batch()
    bn = GlobalBatchNorm(inp["w"].numel())
    with torch.no_grad():
        bn.weight.copy_(inp["w"]), bn.bias.copy_(inp["b"])
    x = inp["x"].clone().requires_grad_(True)
    y = bn(x)
    (y * inp["c"]).sum().backward()
    _check_bn({"y": y, "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "running_mean": bn.running_mean,
               "running_var": bn.running_var}, _bn_reference(inp))


@pytest.mark.slow
def test_global_batch_norm_large_mean_two_ranks(tmp_path):
    """2 gloo ranks with 5 and 7 samples: output, input and affine gradients and running statistics equal
    a float64 BatchNorm over the 12, where the old sum/sum-of-squares all-reduce was ~1e-2 off."""
    from helpers import WORKERS, torchrun

    inp = dict(_offset_batch(), sizes=[5, 7])
    torch.save(inp, tmp_path / "inputs.pt")
    torchrun(WORKERS / "global_bn_ranks.py", tmp_path / "inputs.pt", tmp_path / "out.pt", timeout=200, check=True)
    _check_bn(torch.load(tmp_path / "out.pt"), _bn_reference(inp))
