"""Flow matching, classifier-free guidance, latent diffusion and the denoising base (pretrain/methods/flow.py,
denoising.py): each checked against an independent reference (the exact Gaussian flow in float64, plain
conditional sampling, the frozen VAE's own encoder/decoder)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pretrain.config import load_config, to_dict
from pretrain.methods import create_method
from pretrain.methods.flow import TIME_SCALE, Flow

PIX = ["data.train=unused", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.image_size=8"]
TINY_UNET = ["method.base_channels=8", "method.channel_mults=[1,2]", "method.blocks=1"]


def _method(name="flow", *extra):
    torch.manual_seed(0)
    return create_method(load_config(None, [*PIX, f"method.name={name}", *TINY_UNET, *extra]))


class GaussianVelocity(nn.Module):
    """The exact marginal velocity of the straight-line flow from data N(m, s^2 I) to noise N(0, I), in float64:
    with x_t = (1 - t) x0 + t eps and u = eps - x0, E[u | x_t = x] = -m + c(t) (x - (1 - t) m),
    c(t) = Cov(u, x_t) / Var(x_t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2). Called as a denoiser (x, 1000 t, y)."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s
        self.anchor = nn.Parameter(torch.zeros(()))   # a parameter, so the method can find its device

    def forward(self, x, t, y=None):
        t = (t.double() / TIME_SCALE).view(-1, *[1] * (x.dim() - 1))
        c = (t - (1 - t) * self.s ** 2) / ((1 - t) ** 2 * self.s ** 2 + t ** 2)
        return -self.m + c * (x.double() - (1 - t) * self.m)


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 100, 5e-4), ("euler", 200, 1.5e-2)])
def test_sampler_follows_the_exact_gaussian_flow(sampler, steps, tol):
    """For Gaussian data the flow's ODE maps noise z at t = 1 to m + s z at t = 0 (the monotone transport of
    N(0, 1) onto N(m, s^2)): the sampler, integrating from t = 1 to 0, must land there."""
    m, s = 0.3, 0.2
    method = _method()
    method.net_ema, method.space = GaussianVelocity(m, s), (3, 2, 2)
    z = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    out = method.sample(64, generator=torch.Generator().manual_seed(1), steps=steps, sampler=sampler)
    assert (out.double() - (m + s * z.double())).abs().max() < tol


def test_heun_is_second_order():
    """Halving the step size cuts Heun's error about 4x, Euler's about 2x (the exact flow as the reference)."""
    m, s = 0.3, 0.2
    method = _method()
    method.net_ema, method.space = GaussianVelocity(m, s), (3, 1, 1)
    want = m + s * torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(0)).double()
    err = {(k, n): (method.sample(16, generator=torch.Generator().manual_seed(0), steps=n, sampler=k).double()
                    - want).abs().max().item() for k in ("euler", "heun") for n in (25, 50)}
    assert 3.0 < err["heun", 25] / err["heun", 50] < 5.0
    assert 1.6 < err["euler", 25] / err["euler", 50] < 2.5


class MLPVelocity(nn.Module):
    """A small MLP denoiser for 2-D points laid out as [B, 2, 1, 1] images."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, y=None):
        h = torch.cat([x.flatten(1), (t.float() / TIME_SCALE)[:, None]], 1)
        return self.net(h).view_as(x)


class SwappedInterpolant(Flow):
    """A broken flow: the interpolant runs from noise at t = 0 to data at t = 1, with the same target."""

    @staticmethod
    def interpolant(x0, eps, t):
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        return tb * x0 + (1 - tb) * eps, eps - x0


def _toy_samples(cls):
    """Train `cls`'s objective on a 2-D Gaussian toy (mean MEAN, std STD per axis); return 2000 samples [N, 2]."""
    torch.manual_seed(0)
    method = cls(None, time_sampling="uniform", sampler="heun", sample_steps=40, image_size=8,
                 base_channels=8, channel_mults=[1], blocks=1)
    method.net = MLPVelocity()
    method.space = (2, 1, 1)
    opt = torch.optim.Adam(method.net.parameters(), lr=2e-3)
    for _ in range(600):
        x0 = (MEAN + STD * torch.randn(256, 2)).view(256, 2, 1, 1)
        loss = method.training_step({"views": [x0[None]]}, None)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.net_ema = method.net.eval()
    return method.sample(2000, generator=torch.Generator().manual_seed(0)).view(2000, 2)


MEAN, STD = torch.tensor([0.3, -0.2]), torch.tensor([0.15, 0.05])


@pytest.mark.parametrize("cls,learns", [(Flow, True), (SwappedInterpolant, False)])
def test_flow_learns_a_gaussian_toy_and_a_wrong_interpolant_does_not(cls, learns):
    x = _toy_samples(cls)
    ok = bool(((x.mean(0) - MEAN).abs() < 0.02).all() and ((x.std(0) - STD).abs() < 0.02).all())
    assert ok == learns, (x.mean(0), x.std(0))


# --------------------------------------------------------------------------------------------- conditioning
def test_label_dropout_replaces_labels_with_the_null_label_at_its_rate():
    method = _method("flow", "method.num_classes=10", "method.label_dropout=0.1")
    y = torch.randint(0, 10, (40000,))
    torch.manual_seed(3)
    out = method.train_labels({"label": y})
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))
    assert torch.equal(out[~dropped], y[~dropped])
    assert _method("flow").train_labels({"label": y}) is None   # unconditional: no labels at all


@pytest.mark.parametrize("name", ["flow", "ddpm"])
def test_guidance_is_uncond_plus_scale_times_the_difference(name):
    method = _method(name, "method.num_classes=4")
    for p in method.net.parameters():   # leave the zero-ish init: conditioning must matter
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        cond, uncond = method.net(x, t, y).double(), method.net(x, t, None).double()
        assert torch.allclose(method.guided(method.net, x, t, y, 1.0).double(), cond, atol=1e-6)
        assert torch.allclose(method.guided(method.net, x, t, y, 4.0).double(), uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["flow", "ddpm"])
def test_cfg_scale_one_is_conditional_sampling(name):
    """sample(cfg=1, classes=c) equals sampling a model that always sees class c (no guidance code at all)."""
    method = _method(name, "method.num_classes=4", "method.timesteps=20", "method.sample_steps=5") if name == "ddpm" \
        else _method(name, "method.num_classes=4", "method.sample_steps=5")
    for p in method.net_ema.parameters():
        p.data.normal_(0, 0.2)
    method.eval()
    guided = method.sample(3, generator=torch.Generator().manual_seed(0), cfg=1.0, classes=2)
    net = method.net_ema

    class Always2(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, y=None):
            return self.net(x, t, torch.full((x.shape[0],), 2))

    method.net_ema, method.num_classes = Always2(), 0      # an "unconditional" model that is class 2's
    plain = method.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(guided, plain, atol=1e-6)


def test_sample_labels_default_to_every_class_in_turn_and_check_the_range():
    method = _method("flow", "method.num_classes=3")
    assert method.sample_labels(7, None).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert method.sample_labels(2, 1).tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"--class must be in \[0, 2\]"):
        method.sample_labels(2, 3)
    with pytest.raises(ValueError, match="without classes"):
        _method("flow").sample_labels(2, 1)


# --------------------------------------------------------------------------------------------- no backbone
@pytest.mark.parametrize("name,extra", [("flow", []), ("ddpm", []), ("pixelcnn", []), ("gan", ["method.discriminator=dcgan"])])
def test_pixel_space_methods_build_no_timm_backbone(name, extra):
    """A model name timm does not know: methods that need no backbone never ask for one."""
    method = create_method(load_config(None, [*PIX, f"method.name={name}", "model.name=no_such_model", *extra]))
    assert method.backbone is None or not method.timm_backbone
    with pytest.raises(Exception, match="no_such_model"):
        create_method(load_config(None, ["data.train=unused", "method.name=simclr", "model.name=no_such_model"]))


def test_old_ddpm_checkpoints_with_unet_keys_load():
    old = _method("ddpm")
    sd = {("unet_ema." + k[8:]) if k.startswith("net_ema.") else ("unet." + k[4:]) if k.startswith("net.") else k: v
          for k, v in old.state_dict().items()}
    assert any(k.startswith("unet.") for k in sd) and any(k.startswith("unet_ema.") for k in sd)
    new = _method("ddpm", "method.base_channels=8")
    torch.manual_seed(5)
    for p in new.parameters():
        p.data.zero_()
    new.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))


# --------------------------------------------------------------------------------------------- latent space
@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A random tiny VAE (8 px, 16 latent dims) written by the real `export --which autoencoder`."""
    from pretrain.export import export

    cfg = load_config(None, [*PIX, "method.name=vae", "model.name=resnet10t", "method.latent_dim=16",
                             "method.decoder_width=8"])
    torch.manual_seed(0)
    vae = create_method(cfg)
    for name, buf in vae.named_buffers():   # non-trivial BN statistics: they must travel, and stay frozen
        if name.endswith(("running_mean", "running_var")):
            buf.copy_(torch.rand_like(buf) + 0.5)
    run = tmp_path_factory.mktemp("vae") / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": vae.state_dict(), "config": to_dict(cfg)}, run / "checkpoints" / "step_00000001.pt")
    return vae.eval(), export(run, run.parent / "ae.safetensors", "autoencoder")


def _latent(path, *extra):
    torch.manual_seed(0)
    return create_method(load_config(None, [*PIX, "method.name=flow", f"method.autoencoder={path}",
                                            "method.latent_side=2", "method.base_channels=8",
                                            "method.channel_mults=[1]", "method.blocks=1", *extra]))


def test_latent_flow_trains_on_the_frozen_vaes_scaled_latents(autoencoder):
    vae, path = autoencoder
    method = _latent(path)
    assert method.space == (4, 2, 2) and method.latent_scale.item() == 0
    assert all(torch.equal(a, b) for a, b in zip(method.autoencoder.state_dict().values(), vae.state_dict().values()))
    frozen = {k: v.clone() for k, v in method.autoencoder.state_dict().items()}
    opt = torch.optim.SGD([p for g in method.param_groups(0.0) for p in g["params"]], lr=0.1)
    assert not {id(p) for p in method.autoencoder.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    images = torch.rand(32, 3, 8, 8) * 2 - 1
    torch.manual_seed(7)
    want_z = vae.encode(images)                                           # the same posterior draw
    torch.manual_seed(7)
    method.train()
    loss = method.training_step({"views": [images[None]]}, method.step_context())["loss"]
    loss.backward()
    opt.step()
    zd = want_z.double()
    assert math.isclose(method.latent_scale.item(), 1 / zd.var(unbiased=False).sqrt().item(), rel_tol=1e-4)
    assert all(torch.equal(v, frozen[k]) for k, v in method.autoencoder.state_dict().items())   # weights and BN stats


def test_latent_samples_are_the_vaes_decodings_and_the_scale_is_checkpointed(autoencoder):
    vae, path = autoencoder
    method = _latent(path, "method.sample_steps=3")
    method.latent_scale.fill_(2.5)
    method.eval()
    gens = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    images = method.sample(4, generator=gens())
    # the same latents by hand: the sampler in latent space, then the VAE's decoder on z / scale
    x = torch.randn(4, 4, 2, 2, generator=gens())
    for t, t_next in zip(torch.linspace(1, 0, 4)[:-1], torch.linspace(1, 0, 4)[1:]):
        x = method.ode_step(method.net_ema, x, t, t_next)
    assert images.shape == (4, 3, 8, 8)
    assert torch.allclose(images, vae.decode((x / 2.5).flatten(1)).clamp(-1, 1), atol=1e-6)
    again = _latent(path)
    again.load_state_dict(method.state_dict())
    assert again.latent_scale.item() == 2.5


def test_latent_errors_are_one_line(autoencoder, tmp_path):
    _, path = autoencoder
    with pytest.raises(ValueError, match="latent_side"):
        _latent(path, "method.latent_side=3")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="--which autoencoder"):
        _latent(bad)


def test_sharded_generation_draws_class_i_mod_k_for_sample_i_whatever_the_batches():
    from pretrain.evaluation.fidelity import generate
    from pretrain.methods.generative import sample_generators

    method = _method("flow", "method.num_classes=3", "method.sample_steps=2")
    for p in method.net_ema.parameters():
        p.data.normal_(0, 0.2)
    method.eval()
    whole = generate(method, range(5), 0, 5)
    assert torch.equal(whole, torch.cat([generate(method, [0, 1], 0, 2), generate(method, [2, 3, 4], 0, 1)]))
    from pretrain.evaluation.generative import to_uint8
    assert torch.equal(whole[4:], to_uint8(method.sample(1, generator=sample_generators(0, [4]), classes=[1])))


def test_ema_decay_follows_its_schedule_with_a_warmup():
    """ema_decay: {start: 0.9999, warmup_steps: 100} (EDM/DiT-style ramp from 0): after step s the EMA moved by
    1 - decay(s), the schedule's value there (warmup step s gives 0.9999 (s + 1) / 100)."""
    method = _method("flow", "method.ema_decay={start: 0.9999, warmup_steps: 100}")
    ema0 = [p.detach().clone() for p in method.net_ema.parameters()]
    for p in method.net.parameters():
        p.data.add_(1.0)
    method.after_step(method.step_context(4, 1000))
    d = 0.9999 * 5 / 100
    for e0, p, e in zip(ema0, method.net.parameters(), method.net_ema.parameters()):
        assert torch.allclose(e, d * e0 + (1 - d) * p.detach(), atol=1e-6)


# --------------------------------------------------------------------------------------------- learned sigma
def _sigma_ddpm(*extra):
    return _method("ddpm", "method.learn_sigma=true", "method.timesteps=20", "method.sample_steps=5", *extra)


def test_learned_variance_interpolates_beta_and_beta_tilde():
    """Nichol & Dhariwal eq. 15 in float64 from the betas: v = 1 gives beta_t, v = -1 beta~_t (the first step's
    floored at beta~_1), v = 0 their geometric mean; for a strided step beta = 1 - abar_t / abar_prev."""
    from pretrain.methods.ddpm import betas_for

    m = _sigma_ddpm()
    b = betas_for("cosine", 20)                                                   # float64
    abar = torch.cumprod(1 - b, 0)
    tilde = lambda t, tp: (1 - abar[t] / (abar[tp] if tp >= 0 else 1)) * ((1 - abar[tp]) if tp >= 0 else 0) / (1 - abar[t])  # noqa: E731
    floor = tilde(1, 0)
    for t, tp in [(5, 4), (0, -1), (12, 7)]:
        beta = 1 - abar[t] / (abar[tp] if tp >= 0 else 1)
        lo = max(tilde(t, tp), floor)
        a_t = torch.tensor(float(abar[t]))
        a_p = torch.tensor(float(abar[tp]) if tp >= 0 else 1.0)
        for v, want in [(1.0, beta.log()), (-1.0, lo.log()), (0.0, 0.5 * (beta.log() + lo.log()))]:
            got = m.model_log_var(torch.full((1,), v), a_t, a_p)
            assert got.item() == pytest.approx(float(want), rel=1e-5, abs=1e-5), (t, tp, v)


def test_bound_term_is_the_gaussian_kl_and_the_decoder_nll():
    """vb_terms against torch.distributions: KL(q || p) for t > 0 (q's variance beta~_t, p's the learned one)."""
    from torch.distributions import Normal, kl_divergence

    m = _sigma_ddpm()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x_t, x0_hat = torch.randn(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    v, t = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.tensor([3, 9])
    abar = m.schedule("abar", "cpu").double()
    ab, ap = abar[t].view(-1, 1, 1, 1), abar[t - 1].view(-1, 1, 1, 1)
    beta, x0d, xtd = 1 - ab / ap, x0.double(), x_t.double()
    q_mean = ap.sqrt() * beta / (1 - ab) * x0d + (1 - beta).sqrt() * (1 - ap) / (1 - ab) * xtd     # Ho et al. eq. 7
    p_mean = ap.sqrt() * beta / (1 - ab) * x0_hat.double() + (1 - beta).sqrt() * (1 - ap) / (1 - ab) * xtd
    tilde = beta * (1 - ap) / (1 - ab)
    f = (v.double() + 1) / 2
    p_std = (0.5 * (f * beta.log() + (1 - f) * tilde.log())).exp()
    want = kl_divergence(Normal(q_mean, tilde.sqrt()), Normal(p_mean, p_std)).flatten(1).sum(1)
    assert torch.allclose(m.vb_terms(x0, x_t, t, x0_hat, v).double(), want, rtol=1e-4)


def test_hybrid_loss_trains_the_variance_only_through_the_bound():
    """The bound's gradient reaches the variance channels and never the prediction's (improved DDPM's stop-grad)."""
    m = _sigma_ddpm()
    P = torch.randn(4, 6, 8, 8, requires_grad=True)

    class Fixed(nn.Module):
        def forward(self, x, t, y=None):
            return P * 1

    m.net = Fixed()
    batch = {"views": [torch.rand(1, 4, 3, 8, 8) * 2 - 1]}
    grads = {}
    for name, vb in [("hybrid", m.vb_terms), ("mse", lambda *a: torch.zeros(4))]:
        m.vb_terms = vb
        torch.manual_seed(0)
        grads[name] = torch.autograd.grad(m.training_step(batch, m.step_context())["loss"], P)[0]
    assert torch.equal(grads["hybrid"][:, :3], grads["mse"][:, :3])
    assert grads["mse"][:, 3:].abs().max() == 0 and grads["hybrid"][:, 3:].abs().max() > 0


@pytest.mark.parametrize("denoiser", ["unet", "DiT-S/2"])
def test_learned_sigma_ddpm_trains_and_samples(denoiser):
    m = _sigma_ddpm(f"method.denoiser={denoiser}", "method.dit_depth=1", "method.dit_hidden=32", "method.dit_heads=2",
                    "method.sampler=ddpm")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    batch = {"views": [torch.rand(1, 8, 3, 8, 8) * 2 - 1]}
    losses = []
    for _ in range(5):
        torch.manual_seed(0)
        loss = m.training_step(batch, m.step_context())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    m.ema.update(0.0)
    x = m.eval().sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    assert torch.isfinite(m.bits_per_dim(x, generator=torch.Generator().manual_seed(0))).all()


# --------------------------------------------------------------------------------------------- precomputed latents
def test_precomputed_latents_are_the_vaes_posteriors_and_train_the_latent_flow(autoencoder, digits_shards, tmp_path):
    """`pretrain latents` writes each val digit's posterior (mean, log variance) [2, L]; the training pipeline reads
    them back as batch["latents"] (no augmentation), equal to the VAE's posterior of the centre-cropped image, with
    its label; the latent flow trains on them (one posterior draw, scaled)."""
    from test_data import loader

    from pretrain.data import eval_loader
    from pretrain.evaluation.generative import to_signed
    from pretrain.latents import write_latents

    vae, path = autoencoder
    index = write_latents(path, f"{digits_shards}/val", tmp_path / "lat", batch_size=64, shard_size=50)
    images = torch.cat([b["image"] for b in eval_loader(f"{digits_shards}/val", 256, 8)])
    labels = torch.cat([b["label"] for b in eval_loader(f"{digits_shards}/val", 256, 8)])
    assert index["samples"] == len(images) and len(index["shards"]) == -(-len(images) // 50)
    with torch.no_grad():
        want = torch.stack(vae.posterior(to_signed(images)), 1)                          # [N, 2, L]
    batch = next(loader(str(tmp_path / "lat"), batch=32).batches())
    assert batch["views"] == [] and batch["latents"].shape == (32, 2, 16)
    for lat, y in zip(batch["latents"], batch["label"]):    # each one is some digit's posterior, with its label
        d = (want - lat).abs().flatten(1).amax(1)
        match = d < 1e-5
        assert match.any() and y in labels[match], (d.min(), labels[match], y)
    method = _latent(path)
    torch.manual_seed(0)
    loss = method.training_step(batch, method.step_context())["loss"]
    assert torch.isfinite(loss) and method.latent_scale.item() > 0
    with pytest.raises(ValueError, match="set method.autoencoder"):
        _method("flow").training_step(batch, None)


@pytest.mark.slow
def test_latent_flow_trains_resumes_and_samples_from_latent_shards_via_the_cli(autoencoder, digits_shards, tmp_path):
    """The config chooses: data.train at `pretrain latents` shards trains the same latent flow without encoding."""
    from helpers import cli, tb_scalars, train_overrides

    _, path = autoencoder
    p = cli("latents", path, "--data", f"{digits_shards}/train", "--out-dir", tmp_path / "lat", check=True)
    assert "latents in" in p.stdout
    exp = tmp_path / "latent.yaml"
    exp.write_text("method:\n  name: flow\n")
    ov = [o for o in train_overrides(digits_shards, tmp_path / "run", train__max_steps=3, checkpoint__every_steps=2,
                                     data__image_size=8, data__mean="[0.5,0.5,0.5]", data__std="[0.5,0.5,0.5]",
                                     method__autoencoder=str(path), method__latent_side=2, method__base_channels=8,
                                     method__channel_mults="[1]", method__blocks=1, method__sample_steps=2,
                                     log__sample_every_steps=3, log__sample_n=4)
          if not o.startswith(("method.proj", "data.train="))] + [f"data.train={tmp_path / 'lat'}"]
    cli("train", exp, *ov, check=True)
    assert (tmp_path / "run" / "samples" / "step_00000003.png").is_file()
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    import shutil
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000002.pt", resumed)
    cli("train", exp, *[o for o in ov if not o.startswith("run_dir=")], f"run_dir={resumed.parent}", check=True)
    want, got = tb_scalars(tmp_path / "run", "train/loss"), tb_scalars(resumed.parent, "train/loss")
    assert sorted(got) == [3] and got[3] == pytest.approx(want[3], rel=1e-6)
