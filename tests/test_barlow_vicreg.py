"""Barlow Twins and VICReg: each loss against a float64 reference written out element by element, the
cross-rank proof on the embeddings with 2 real processes (the summed cross-correlation; variance and
covariance over embeddings gathered with gradients), and the paper-scale reference configs.

The registry-wide tests (test_methods.py, test_method_params.py, test_rank_equivalence.py) cover what
every method shares: training, export, parameter rules, and W ranks x B == 1 process x W*B through DDP
and DeepSpeed for the whole method."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import WORKERS, torchrun
from pretrain.config import load_config
from pretrain.methods import create_method
from pretrain.methods.barlow_twins import barlow_twins_loss, cross_correlation
from pretrain.methods.vicreg import variance_covariance, vicreg_terms
from test_recipes import _spec, _views

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BN_EPS = 1e-5     # nn.BatchNorm1d's, which normalises the Barlow Twins embeddings
VAR_EPS = 1e-4    # VICReg's, inside the square root


# ------------------------------------------------------------------------------------------------ references
def _columns(z):
    """[N, D] tensor -> D lists of N python floats."""
    return [[float(z[b, d]) for b in range(z.shape[0])] for d in range(z.shape[1])]


def ref_barlow_twins(z1, z2, lambd):
    """Barlow Twins' loss, entry by entry: each dimension standardised over the batch (biased variance plus
    BN's eps, as BatchNorm1d(affine=False) in train mode), C_ij = sum_b a_bi b_bj / N,
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2. Returns (loss, C as a list of rows)."""
    def standardise(col):
        m = sum(col) / len(col)
        v = sum((x - m) ** 2 for x in col) / len(col)
        return [(x - m) / math.sqrt(v + BN_EPS) for x in col]

    a, b = [standardise(c) for c in _columns(z1)], [standardise(c) for c in _columns(z2)]
    N, D = z1.shape
    C = [[sum(a[i][n] * b[j][n] for n in range(N)) / N for j in range(D)] for i in range(D)]
    loss = 0.0
    for i in range(D):
        for j in range(D):
            loss += (1 - C[i][j]) ** 2 if i == j else lambd * C[i][j] ** 2
    return loss, C


def ref_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0):
    """VICReg's terms, entry by entry, as the official main_vicreg.py: invariance = mean squared difference;
    per branch, std_d = sqrt(unbiased var_d + 1e-4), variance = mean_d max(0, 1 - std_d), covariance =
    sum_{i != j} Cov_ij^2 / D with Cov_ij = sum_n (x_ni - m_i)(x_nj - m_j) / (N - 1); variance averaged over
    the two branches, covariance summed. Returns (loss, invariance, variance, covariance)."""
    N, D = z1.shape
    inv = sum((float(z1[n, d]) - float(z2[n, d])) ** 2 for n in range(N) for d in range(D)) / (N * D)
    var_terms, cov_terms = [], []
    for z in (z1, z2):
        cols = _columns(z)
        means = [sum(c) / N for c in cols]
        v = 0.0
        for d in range(D):
            s = math.sqrt(sum((x - means[d]) ** 2 for x in cols[d]) / (N - 1) + VAR_EPS)
            v += max(0.0, 1 - s)
        var_terms.append(v / D)
        c = 0.0
        for i in range(D):
            for j in range(D):
                if i != j:
                    cij = sum((cols[i][n] - means[i]) * (cols[j][n] - means[j]) for n in range(N)) / (N - 1)
                    c += cij ** 2
        cov_terms.append(c / D)
    var, cv = sum(var_terms) / 2, sum(cov_terms)
    return sim * inv + std * var + cov * cv, inv, var, cv


def _embeddings(n, d, seed, scale=1.0):
    """Two correlated views with per-dimension offsets and scales (so normalisation matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    offset, gain = torch.randn(d, generator=g) * 3, torch.rand(d, generator=g) * 2 + 0.2
    z1 = (base + 0.5 * torch.randn(n, d, generator=g)) * gain * scale + offset
    z2 = (base + 0.5 * torch.randn(n, d, generator=g)) * gain * scale + offset
    return z1, z2


@pytest.mark.parametrize("n, d, lambd", [(2, 3, 0.005), (7, 5, 0.1), (16, 9, 0.0051)])
def test_barlow_twins_loss_matches_reference(n, d, lambd):
    z1, z2 = _embeddings(n, d, seed=n)
    bn = nn.BatchNorm1d(d, affine=False)
    c = cross_correlation(bn(z1), bn(z2))
    loss, on, off = barlow_twins_loss(c, lambd)
    want, C = ref_barlow_twins(z1.double(), z2.double(), lambd)
    torch.testing.assert_close(c.double(), torch.tensor(C, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert on.item() + lambd * off.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("n, d, scale", [(2, 3, 1.0), (7, 5, 0.3), (16, 9, 2.0)])
def test_vicreg_loss_matches_reference(n, d, scale):
    """Scales below and above 1 so that the hinge max(0, 1 - std) is both active and not."""
    z1, z2 = _embeddings(n, d, seed=n, scale=scale)
    inv, var, cov = vicreg_terms(z1, z2)
    want = ref_vicreg(z1.double(), z2.double())
    got = (25 * inv + 25 * var + cov, inv, var, cov)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w, rel=1e-5, abs=1e-7)


def test_vicreg_variance_is_unbiased_and_hinged():
    """A dimension with unbiased std exactly 2 contributes nothing; one with std 0.5 contributes 0.5 (x 1/D)."""
    z = torch.tensor([[-1.0, -0.25], [1.0, 0.25]]) * math.sqrt(2)   # unbiased var: 4 and 0.25 (biased: 2, 0.125)
    var, _ = variance_covariance(z, eps=0.0)
    assert var.item() == pytest.approx(0.5 / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------ the methods
def _method(name, *extra):
    cfg = load_config(None, ["data.train=x", "model.name=resnet10t", "data.image_size=16", f"method.name={name}",
                             "method.proj_hidden_dim=16", "method.proj_dim=6", *extra])
    torch.manual_seed(0)
    return create_method(cfg).train(), cfg


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_method_loss_is_the_reference_on_per_view_forwards(name):
    """Each view goes through backbone and head in a forward of its own (BN statistics per view, as both
    official codes): the method's loss equals the float64 reference on embeddings computed view by view."""
    m, _ = _method(name)
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(8, 3, 16, 16, generator=g)
    v2 = 2 * torch.randn(8, 3, 16, 16, generator=g) + 1                 # other statistics than v1
    ref = copy.deepcopy(m).double()
    loss = m.training_step({"views": [torch.stack([v1, v2])]}, m.step_context())["loss"]
    with torch.no_grad():
        z1, z2 = (ref.projector(ref.backbone(v.double())) for v in (v1, v2))
    want = ref_barlow_twins(z1, z2, m.lambd)[0] if name == "barlow_twins" else ref_vicreg(z1, z2)[0]
    assert loss.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_heads_are_the_official_ones(name):
    """Linear (no bias) -> BN -> ReLU, twice, then Linear without bias (both official codes' last layer);
    Barlow Twins then normalises the embeddings with BatchNorm1d(affine=False)."""
    m, _ = _method(name)
    kinds = [type(x) for x in m.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert all(x.bias is None for x in m.projector if isinstance(x, nn.Linear))
    if name == "barlow_twins":
        assert isinstance(m.bn, nn.BatchNorm1d) and not m.bn.affine


def test_barlow_twins_bias_lr_follows_the_schedule_scaled():
    """The paper's two LRs through the real backend: weights at the scheduled LR, biases and BN parameters
    (no weight decay, no LARS adaptation) at bias_lr_scale times it; VICReg has one LR."""
    from pretrain.engine.backends import DDPBackend

    m, cfg = _method("barlow_twins", "optim.name=lars", "optim.weight_decay=1.5e-6")
    be = DDPBackend(m, cfg, torch.device("cpu"))
    be.set_lr(1.6)
    decay, plain = be.optimizers["main"].param_groups
    assert (decay["lr"], decay["weight_decay"], decay["lars_exclude"]) == (1.6, 1.5e-6, False)
    assert plain["lr"] == pytest.approx(1.6 * 0.0048 / 0.2) and plain["weight_decay"] == 0 and plain["lars_exclude"]
    assert {id(p) for p in plain["params"]} == {id(p) for p in m.parameters() if p.ndim == 1}
    v, cfg = _method("vicreg", "optim.name=lars")
    be = DDPBackend(v, cfg, torch.device("cpu"))
    be.set_lr(1.6)
    assert [g["lr"] for g in be.optimizers["main"].param_groups] == [1.6, 1.6]


# ------------------------------------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("bv")
    z1, z2 = _embeddings(12, 8, seed=3)
    inputs = {"z1": z1, "z2": z2, "lambd": 0.1}   # a large lambda, so the off-diagonal gradient counts
    torch.save(inputs, d / "inputs.pt")
    torchrun(WORKERS / "barlow_vicreg_ranks.py", d / "inputs.pt", d / "out.pt", timeout=200, check=True)
    return inputs, torch.load(d / "out.pt"), 2


def _close(got, want, rel=1e-4):
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


def _far(got, want):
    return (got - want).norm() > 1e-2 * want.norm()


def _leaves(inputs):
    return inputs["z1"].clone().requires_grad_(True), inputs["z2"].clone().requires_grad_(True)


@pytest.mark.slow
def test_barlow_twins_two_ranks_sum_the_global_cross_correlation(two_ranks):
    """Every rank holds the cross-correlation and loss of the whole batch, and its gradient is that of the
    sum of the W (equal) rank losses, which DDP's average over ranks turns into the one-process gradient.
    Teeth: solo-learn's mean of per-rank matrices (each normalised with its own rank's BN statistics) is
    another matrix; the official in-place all_reduce gives 1/W of the gradient."""
    inputs, res, W = two_ranks
    z1, z2 = _leaves(inputs)
    bn = nn.BatchNorm1d(z1.shape[1], affine=False)
    c = cross_correlation(bn(z1), bn(z2))
    loss = barlow_twins_loss(c, inputs["lambd"])[0]
    (loss * W).backward()
    for r_loss, r_c, _, _ in res["barlow"]:
        assert r_loss.item() == pytest.approx(loss.item(), rel=1e-5)
        _close(r_c, c.detach())
    g1, g2 = torch.cat([p[2] for p in res["barlow"]]), torch.cat([p[3] for p in res["barlow"]])
    _close(g1, z1.grad)
    _close(g2, z2.grad)

    # the official code: the same forward, each rank's gradient is 1/W of it
    off = res["barlow_official"]
    _close(off[0][1], c.detach())
    o1 = torch.cat([p[2] for p in off])
    _close(o1, z1.grad / W)
    assert _far(o1, z1.grad)

    # the mean of per-rank matrices, each from its own rank's BN statistics: not the global matrix
    B = z1.shape[0] // W
    with torch.no_grad():
        per_rank = [cross_correlation(bn(inputs["z1"][r * B:(r + 1) * B]), bn(inputs["z2"][r * B:(r + 1) * B]))
                    for r in range(W)]
        mean = torch.stack(per_rank).mean(0)
        assert _far(mean, c)
        assert abs(barlow_twins_loss(mean, inputs["lambd"])[0].item() - loss.item()) > 1e-2 * loss.item()


@pytest.mark.slow
def test_vicreg_two_ranks_gather_with_gradients(two_ranks):
    """Variance and covariance of the gathered embeddings equal those of the whole batch on every rank,
    the per-rank invariance terms average to the global one, and each rank's gradient is that of the sum of
    the rank losses (so DDP's average is the one-process gradient). Teeth: per-rank statistics (no gather)
    give other terms; a gather that does not sum the gradients over ranks gives 1/W of the variance and
    covariance gradient."""
    inputs, res, W = two_ranks
    z1, z2 = _leaves(inputs)
    inv, var, cov = vicreg_terms(z1, z2)
    loss = 25 * inv + 25 * var + cov
    (loss * W).backward()
    parts = res["vicreg"]
    assert torch.stack([p[0] for p in parts]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.stack([p[1] for p in parts]).mean().item() == pytest.approx(inv.item(), rel=1e-5)
    for p in parts:
        assert (p[2].item(), p[3].item()) == pytest.approx((var.item(), cov.item()), rel=1e-5)
    g1, g2 = torch.cat([p[4] for p in parts]), torch.cat([p[5] for p in parts])
    _close(g1, z1.grad)
    _close(g2, z2.grad)

    own = res["vicreg_own_slice"]
    assert _far(torch.cat([p[1] for p in own]), z1.grad)

    B = z1.shape[0] // W
    with torch.no_grad():
        local = [vicreg_terms(inputs["z1"][r * B:(r + 1) * B], inputs["z2"][r * B:(r + 1) * B]) for r in range(W)]
        assert abs(sum(t[1].item() for t in local) / W - var.item()) > 1e-3 * var.item()
        assert abs(sum(t[2].item() for t in local) / W - cov.item()) > 1e-2 * cov.item()


# ------------------------------------------------------------------------------------------------ reference configs
#: BYOL's asymmetric pair (Grill et al. 2020, table 6), written out from the official Barlow Twins main.py
#: Transform and VICReg augmentations.py (identical): RandomResizedCrop 224 (scale 0.08-1), flip 0.5,
#: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur (sigma 0.1-2) p 1.0 / 0.1, solarize p 0 / 0.2.
OFFICIAL_VIEWS = [_spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
                  _spec((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)]


def test_barlow_twins_resnet50_is_the_papers_recipe():
    """Barlow Twins (Zbontar et al. 2021) and facebookresearch/barlowtwins main.py: batch 2048, 1000 epochs,
    LARS (eta 0.001, momentum 0.9) lr 0.2 x B/256 for weights and 0.0048 x B/256 for biases and BN, wd 1.5e-6
    (paper; code 1e-6), 10 warmup epochs, cosine to 1/1000 of the peak, lambda 5e-3 (paper; code 0.0051),
    projector 8192-8192-8192, SyncBN."""
    c = load_config(str(CONFIGS / "barlow_twins_resnet50.yaml"))
    assert (c.method.name, c.model.name, c.data.image_size) == ("barlow_twins", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (2048, 1000)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum,
            c.optim.trust_coefficient, c.optim.warmup_epochs) == ("lars", 0.2, "linear", 1.5e-6, 0.9, 0.001, 10)
    assert c.optim.min_lr == pytest.approx(0.2 * 2048 / 256 / 1000)
    assert c.optim.lr * c.method.bias_lr_scale == pytest.approx(0.0048)
    assert (c.method.proj_layers, c.method.proj_hidden_dim, c.method.proj_dim, c.method.lambd) == (3, 8192, 8192, 5e-3)
    assert c.method.sync_bn is True
    assert _views(c) == OFFICIAL_VIEWS


def test_vicreg_resnet50_is_the_papers_recipe():
    """VICReg (Bardes, Ponce & LeCun 2022) and facebookresearch/vicreg main_vicreg.py with its README's
    1000-epoch command: batch 2048, base lr 0.2 x B/256 for every parameter, LARS (eta 0.001, momentum 0.9),
    wd 1e-6, 10 warmup epochs, cosine to 1/1000 of the peak, expander 8192-8192-8192, 25 / 25 / 1, SyncBN."""
    c = load_config(str(CONFIGS / "vicreg_resnet50.yaml"))
    assert (c.method.name, c.model.name, c.data.image_size) == ("vicreg", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (2048, 1000)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum,
            c.optim.trust_coefficient, c.optim.warmup_epochs) == ("lars", 0.2, "linear", 1e-6, 0.9, 0.001, 10)
    assert c.optim.min_lr == pytest.approx(0.2 * 2048 / 256 / 1000)
    assert (c.method.proj_layers, c.method.proj_hidden_dim, c.method.proj_dim) == (3, 8192, 8192)
    assert (c.method.sim_coeff, c.method.std_coeff, c.method.cov_coeff, c.method.sync_bn) == (25, 25, 1, True)
    assert _views(c) == OFFICIAL_VIEWS


@pytest.mark.parametrize("name", ["barlow_twins_resnet50.yaml", "vicreg_resnet50.yaml"])
def test_reference_configs_build(name):
    m = create_method(load_config(str(CONFIGS / name)))
    assert m.projector[0].out_features == 8192 and m.projector[-1].out_features == 8192
