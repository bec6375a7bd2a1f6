"""BYOL and SimSiam: their losses against float64 references written out sample by sample, BYOL's target
(no gradient, the cosine tau schedule, export --which key), SimSiam's stop-gradient and its predictor's
fixed LR through the real backend, and their reference configs against the papers' numbers.

The paper numbers are written here from the papers and the official code (deepmind-research/byol,
facebookresearch/simsiam), not read from the methods."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from helpers import cli, train_overrides
from pretrain.config import load_config
from pretrain.engine.backends import DDPBackend
from pretrain.engine.checkpoint import find_checkpoint
from pretrain.methods import create_method
from pretrain.schedules import Schedule, warmup_cosine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HEADS = {"byol": ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32"],
         "simsiam": ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=8"]}


def _method(name, *extra):
    cfg = load_config(None, ["data.train=x", "model.name=resnet10t", "data.image_size=16", f"method.name={name}",
                             *HEADS[name], *extra])
    torch.manual_seed(0)
    return create_method(cfg), cfg


def _views(B=8, seed=0):
    """Two views of B samples with different statistics: [2, B, 3, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(B, 3, 16, 16, generator=g), 2 * torch.randn(B, 3, 16, 16, generator=g) + 1])


def _batch(views):
    return {"views": [views]}   # one view size: one group [V, B, 3, S, S]


def _norm(x):
    return math.sqrt(sum(v * v for v in x))


# ------------------------------------------------------------------------------------------------ losses
def _byol_ref(p1, p2, z1, z2):
    """mean_b |p1_b/|p1_b| - z2_b/|z2_b||^2 + |p2_b/|p2_b| - z1_b/|z1_b||^2, one sample at a time, in float64
    (the official helpers.regression_loss is the squared distance of the normalised vectors)."""
    total = 0.0
    for b in range(len(p1)):
        for p, z in ((p1[b].tolist(), z2[b].tolist()), (p2[b].tolist(), z1[b].tolist())):
            np_, nz = _norm(p), _norm(z)
            total += sum((a / np_ - c / nz) ** 2 for a, c in zip(p, z))
    return total / len(p1)


def _simsiam_ref(p1, p2, z1, z2):
    """D(p1, z2)/2 + D(p2, z1)/2, D(p, z) = -mean_b p_b.z_b / (|p_b| |z_b|), one sample at a time, float64."""
    def D(p, z):
        return -sum(sum(a * c for a, c in zip(pb, zb)) / (_norm(pb) * _norm(zb)) for pb, zb in zip(p.tolist(), z.tolist())) / len(p)
    return D(p1, z2) / 2 + D(p2, z1) / 2


def test_byol_loss_matches_a_float64_reference():
    """Each view through each network in its own forward (BN per view), the target without gradient."""
    m, _ = _method("byol")
    m.train()
    views = _views()
    ref = copy.deepcopy(m).double()
    loss = m.training_step(_batch(views), m.step_context())["loss"]
    with torch.no_grad():
        p1, p2 = (ref.predictor(ref.projector(ref.backbone(v.double()))) for v in views)
        z1, z2 = (ref.key_projector(ref.key_backbone(v.double())) for v in views)
    want = _byol_ref(p1, p2, z1, z2)
    assert 0 < want < 8
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_simsiam_loss_matches_a_float64_reference():
    m, _ = _method("simsiam")
    m.train()
    views = _views()
    ref = copy.deepcopy(m).double()
    loss = m.training_step(_batch(views), m.step_context())["loss"]
    with torch.no_grad():
        z1, z2 = (ref.projector(ref.backbone(v.double())) for v in views)
        p1, p2 = ref.predictor(z1), ref.predictor(z2)
    want = _simsiam_ref(p1, p2, z1, z2)
    assert -1 <= want <= 1
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_losses_at_known_points():
    """Aligned vectors: BYOL 0 and SimSiam -1; opposite: 4 (per direction) and +1; scale does not matter."""
    from pretrain.methods.byol import regression_loss
    from pretrain.methods.simsiam import negative_cosine

    x = torch.randn(4, 16)
    assert regression_loss(3 * x, x).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    assert regression_loss(-x, 2 * x).tolist() == pytest.approx([4.0] * 4, abs=1e-6)
    assert negative_cosine(x, 5 * x).item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine(-x, x).item() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ BYOL's target
def _tau(k, K, base=0.996):
    """BYOL (section 3.2; schedules.target_ema): tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2


def test_byol_target_gets_no_gradient_and_follows_the_cosine_tau():
    """Through the real backend: the target (key_backbone, key_projector) has no gradient and no optimizer
    moves it; after_step(k, K) moves it as target <- tau(k) target + (1 - tau(k)) online."""
    m, cfg = _method("byol")
    assert m.schedules["momentum"] == Schedule(0.996, 1.0, "cosine")
    be = DDPBackend(m, cfg, torch.device("cpu"))
    be.set_lr(0.5)
    target = {n: p for n, p in m.named_parameters() if n.startswith("key_")}
    online = {n: p for n, p in m.named_parameters() if not n.startswith("key_")}
    assert target and all(not p.requires_grad for p in target.values())
    before = {n: p.detach().clone() for n, p in target.items()}
    with be.accumulate(last=True):
        be.backward(be.forward(_batch(_views()))["loss"])
    assert all(p.grad is None for p in target.values())
    # every online parameter has a gradient (zero where timm's zero-initialised last BN of a block blocks it)
    assert all(p.grad is not None for p in online.values())
    assert all(online[f"{n}.weight"].grad.abs().sum() > 0 for n in ("projector.0", "predictor.0", "predictor.3"))
    be.step()
    assert all(torch.equal(p, before[n]) for n, p in target.items())       # the optimizer left it alone
    K = 90
    for k in (0, 30, 45, 90):
        old = {n: p.detach().double().clone() for n, p in target.items()}
        m.after_step(m.step_context(k, K))
        tau = _tau(k, K)
        for n, p in target.items():
            want = tau * old[n] + (1 - tau) * online[n[len("key_"):]].detach().double()
            torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-7, msg=f"k={k} {n}")
    assert _tau(90, 90) == 1.0 and all(torch.equal(p, old[n].float()) for n, p in target.items())   # tau(K) = 1
    moved = [n for n in target if "weight" in n and not torch.equal(target[n], before[n])]
    assert moved


@pytest.mark.slow
@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_digits_config_trains_and_exports(name, tmp_path, digits_shards):
    """`pretrain train configs/digits_<name>.yaml` for 2 real steps, then `pretrain export`; BYOL exports
    the online backbone by default and the target with --which key (the checkpoint's key_backbone)."""
    run_dir = tmp_path / "run"
    cli("train", CONFIGS / f"digits_{name}.yaml",
        *train_overrides(digits_shards, run_dir, train__max_steps=2, train__global_batch_size=16), *HEADS[name],
        timeout=240, check=True)
    state = torch.load(find_checkpoint(run_dir), map_location="cpu", weights_only=True)["model"]
    for which, prefix in [("default", "backbone.")] + ([("key", "key_backbone.")] if name == "byol" else []):
        out = tmp_path / f"{which}.safetensors"
        cli("export", run_dir, "--out", out, "--which", which, check=True)
        exported = load_file(str(out))
        ref = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert set(exported) == set(ref)
        for k in exported:
            torch.testing.assert_close(exported[k], ref[k], msg=f"{which}: {k}")
        assert json.loads(out.with_suffix(".json").read_text())["which"] == which
    if name == "byol":   # the target is its own network: it lags the online one
        assert any(not torch.equal(v, state[k.replace("key_", "", 1)]) for k, v in state.items()
                   if k.startswith("key_backbone.") and k.endswith("weight"))


# ------------------------------------------------------------------------------------------------ SimSiam
def test_simsiam_stops_the_gradient_of_the_z_branch():
    """The gradient equals a float64 reference with z detached, and not one without the stop-gradient:
    z_i reaches the loss only through p_i = predictor(z_i)."""
    m, _ = _method("simsiam")
    views = _views()
    ref = copy.deepcopy(m).double()
    m.training_step(_batch(views), m.step_context())["loss"].backward()
    got = torch.cat([p.grad.flatten().double() for p in m.parameters()])

    def ref_grad(stop):
        ref.zero_grad(set_to_none=False)
        z1, z2 = (ref.projector(ref.backbone(v.double())) for v in views)
        p1, p2 = ref.predictor(z1), ref.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        cos = nn.functional.cosine_similarity
        (-(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2).backward()
        return torch.cat([p.grad.flatten() for p in ref.parameters()])

    with_stop, without = ref_grad(True), ref_grad(False)
    assert (got - with_stop).norm() / with_stop.norm() < 1e-4
    assert (got - without).norm() / without.norm() > 0.05
    # the predictor's gradient is the same either way: only the encoder sees the stop-gradient
    n_pred = sum(p.numel() for p in m.predictor.parameters())
    torch.testing.assert_close(with_stop[-n_pred:], without[-n_pred:])


def _groups(be):
    return [g for opt in be.optimizers.values() for g in opt.param_groups]


@pytest.mark.parametrize("optim", ["sgd", "lars", "adamw"])
def test_simsiam_predictor_keeps_the_peak_lr(optim):
    """fix_pred_lr (main_simsiam.py --fix-pred-lr): through the backend's set_lr, the predictor's groups hold
    the peak LR at every step of warmup and cosine while the encoder's follow the schedule. Needs the
    engine's `fixed_lr` group key (issue 12, interface item 4)."""
    m, cfg = _method("simsiam", f"optim.name={optim}", "optim.weight_decay=1e-4")
    be = DDPBackend(m, cfg, torch.device("cpu"))
    pred = {id(p) for p in m.predictor.parameters()}
    groups = _groups(be)
    fixed = [g for g in groups if all(id(p) in pred for p in g["params"])]
    assert {id(p) for g in fixed for p in g["params"]} == pred
    assert all(not any(id(p) in pred for p in g["params"]) for g in groups if g not in fixed)
    assert any(g["weight_decay"] > 0 for g in fixed) and any(g["weight_decay"] == 0 for g in fixed)
    peak, total, warmup = 0.1, 20, 5
    for step in range(total):
        lr = warmup_cosine(step, total, peak, warmup)
        be.set_lr(lr, peak)
        for g in groups:
            assert g["lr"] == pytest.approx(peak if g in fixed else lr), (step, g in fixed)
    # off: every group follows the schedule
    m2, cfg2 = _method("simsiam", f"optim.name={optim}", "method.fix_pred_lr=false")
    be2 = DDPBackend(m2, cfg2, torch.device("cpu"))
    be2.set_lr(0.01, 0.1)
    assert all(g["lr"] == pytest.approx(0.01) for g in _groups(be2))


# ------------------------------------------------------------------------------------------------ heads, configs
def _ref(name):
    return load_config(str(CONFIGS / name))


def _layers(head):
    """(kind, in, out, bias / affine) per layer of an MLP head."""
    out = []
    for x in head:
        if isinstance(x, nn.Linear):
            out.append(("linear", x.in_features, x.out_features, x.bias is not None))
        elif isinstance(x, nn.BatchNorm1d):
            out.append(("bn", x.num_features, x.num_features, x.affine))
        elif isinstance(x, nn.ReLU):
            out.append(("relu",))
    return out


def test_byol_resnet50_is_the_papers_1000_epoch_recipe():
    """BYOL (Grill et al. 2020) section 3.3 and deepmind-research/byol configs/byol.py (1000-epoch presets):
    batch 4096, LARS (momentum 0.9, eta 1e-3) lr 0.2 x B/256, wd 1.5e-6, 10 warmup epochs then cosine to 0,
    tau 0.996 -> 1 by a cosine; networks.py MLP: Linear(4096) -> BN -> ReLU -> Linear(256, no bias), the
    predictor the same on the 256-d projection; cross-replica BN; table 6's asymmetric views."""
    from test_recipes import BYOL, _views as config_views

    c = _ref("byol_resnet50.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("byol", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (4096, 1000)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum,
            c.optim.trust_coefficient, c.optim.warmup_epochs, c.optim.min_lr) == (
        "lars", 0.2, "linear", 1.5e-6, 0.9, 1e-3, 10, 0.0)
    assert (c.method.momentum, c.method.sync_bn) == ({"shape": "cosine", "start": 0.996, "end": 1.0}, True)
    assert config_views(c) == BYOL
    m = create_method(c)
    assert m.cross_rank_exact
    mlp = [("linear", 2048, 4096, False), ("bn", 4096, 4096, True), ("relu",), ("linear", 4096, 256, False)]
    assert _layers(m.projector) == mlp
    assert _layers(m.predictor) == [("linear", 256, 4096, False)] + mlp[1:]
    assert _layers(m.key_projector) == mlp and type(m.key_backbone) is type(m.backbone)


def test_simsiam_resnet50_is_the_official_100_epoch_recipe():
    """SimSiam (Chen & He 2021) facebookresearch/simsiam README (--fix-pred-lr) on main_simsiam.py's defaults:
    batch 512, SGD (momentum 0.9) lr 0.05 x B/256, wd 1e-4, 100 epochs, cosine without warmup, the predictor at
    the initial LR; builder.py: projector 3 x (Linear 2048 no bias -> BN), ReLU after the first two, the last
    BN without affine; predictor Linear(512, no bias) -> BN -> ReLU -> Linear(2048); SyncBN; MoCo v2's views."""
    from test_recipes import SIMSIAM, _views as config_views

    c = _ref("simsiam_resnet50.yaml")
    assert (c.method.name, c.model.name, c.data.image_size) == ("simsiam", "resnet50", 224)
    assert (c.train.global_batch_size, c.train.epochs) == (512, 100)
    assert (c.optim.name, c.optim.lr, c.optim.lr_scaling, c.optim.weight_decay, c.optim.momentum,
            c.optim.warmup_epochs, c.optim.min_lr) == ("sgd", 0.05, "linear", 1e-4, 0.9, 0, 0.0)
    assert c.optim.warmup_steps is None
    assert (c.method.fix_pred_lr, c.method.sync_bn) == (True, True)
    assert config_views(c) == SIMSIAM
    m = create_method(c)
    assert m.cross_rank_exact and not hasattr(m, "key_backbone")
    assert _layers(m.projector) == [("linear", 2048, 2048, False), ("bn", 2048, 2048, True), ("relu",),
                                    ("linear", 2048, 2048, False), ("bn", 2048, 2048, True), ("relu",),
                                    ("linear", 2048, 2048, False), ("bn", 2048, 2048, False)]
    assert _layers(m.predictor) == [("linear", 2048, 512, False), ("bn", 512, 512, True), ("relu",),
                                    ("linear", 512, 2048, True)]


@pytest.mark.parametrize("name", ["digits_byol.yaml", "digits_simsiam.yaml"])
def test_digits_configs_keep_heads_modest(name):
    """The registry-wide 2-rank test builds the method from its digits config: heads of at most 512."""
    c = _ref(name)
    dims = [v for k, v in c.method.items() if k.endswith("_dim")]
    assert dims and max(dims) <= 512
    assert c.model.name == "resnet18" and c.data.image_size == 16 and c.train.global_batch_size == 256


def test_simsiam_projector_width_defaults_to_the_backbones():
    """builder.py: the projector's hidden layers are as wide as the backbone's features (prev_dim), whatever
    the backbone: 512 for a resnet10t, not the ResNet-50's 2048."""
    from pretrain.config import load_config
    from pretrain.methods import create_method

    m = create_method(load_config(None, ["data.train=x", "model.name=resnet10t", "method.name=simsiam"]))
    first = next(x for x in m.projector if isinstance(x, torch.nn.Linear))
    assert first.in_features == first.out_features == m.backbone.num_features == 512
