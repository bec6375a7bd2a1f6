"""VAE, GAN, PixelCNN and DDPM on the shared engine: likelihood maths, PixelCNN causality, samplers,
resume, the CLI (`pretrain sample`, `pretrain eval gen`) and bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import cli, inproc_error_line, tb_scalars, train_overrides
from pretrain.config import load_config
from pretrain.evaluation.generative import frechet_distance, histogram_bits_per_dim
from pretrain.losses.likelihood import discretized_log_prob, logistic_mixture_log_prob
from pretrain.methods import create_method
from pretrain.models import ModelError

GEN = ["data.train=unused", "model.name=resnet10t", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
SMALL = {"vae": ["method.latent_dim=8", "method.decoder_width=8"],
         "gan": ["method.latent_dim=8", "method.width=8"],
         "pixelcnn": ["method.dim=8", "method.layers=3"],
         "ddpm": ["method.base_channels=8", "method.channel_mults=[1,2]", "method.blocks=1", "method.timesteps=20",
                  "method.sample_steps=5", "method.bound_samples=19"],
         # a class-conditional tiny DiT: conditioning, label dropout and the transformer go through the engine too
         "flow": ["method.denoiser=DiT-S/2", "method.dit_depth=2", "method.dit_hidden=32", "method.dit_heads=2",
                  "method.num_classes=10", "method.sample_steps=3"]}
LEVELS = torch.arange(256).float() / 127.5 - 1            # every 8-bit value in [-1, 1]


def _method(name, size=8, *extra):
    return create_method(load_config(None, GEN + [f"method.name={name}", f"data.image_size={size}", *SMALL[name], *extra]))


# ------------------------------------------------------------------------------------------------ likelihoods
@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretized_likelihood_sums_to_one_over_the_256_values(kind):
    mean, log_scale = torch.tensor([-0.3, 0.0, 0.95]), torch.tensor([-3.0, -1.0, -4.5])
    x = LEVELS[:, None].expand(256, 3)
    p = discretized_log_prob(x, mean.expand(256, 3), log_scale.expand(256, 3), kind).exp().sum(0)
    torch.testing.assert_close(p, torch.ones(3), rtol=1e-4, atol=1e-4)


def test_logistic_mixture_sums_to_one():
    params = torch.randn(1, 1, 9, 1, 1).expand(256, 1, 9, 1, 1)     # K = 3 mixture components
    p = logistic_mixture_log_prob(LEVELS.view(256, 1, 1, 1), params).exp().sum()
    assert p.item() == pytest.approx(1.0, abs=1e-4)


def test_histogram_baseline_and_frechet_distance():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 4, (500, 3, 2, 2), generator=g, dtype=torch.uint8)   # 4 equiprobable values
    bpd = histogram_bits_per_dim(train, torch.randint(0, 4, (100, 3, 2, 2), generator=g, dtype=torch.uint8), alpha=1e-3)
    assert bpd == pytest.approx(2.0, abs=0.05)                                        # log2(4) bits per value
    a = torch.randn(2000, 4, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0, 0.0])) == pytest.approx(5.0, abs=1e-6)


def test_frechet_distance_equals_the_sqrtm_formula_on_correlated_features():
    """The eigenvalue form against scipy's matrix square root of S_a S_b (the pytorch-fid formula), float64."""
    import numpy as np
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.3
    A, B = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    want = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(sa + sb) - 2 * np.trace(linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------------------ PixelCNN
def test_pixelcnn_is_causal_in_raster_order():
    """The output at pixel i (all channels, all logits) has zero gradient w.r.t. every input pixel
    >= i in raster order (all channels), and non-zero w.r.t. some earlier ones."""
    m = _method("pixelcnn", 6, "method.kernel=3")
    S = 6
    x = torch.randn(1, 3, S, S, requires_grad=True)
    out = m.net(x)                                                        # [1, 3, K, S, S]
    for i in range(S * S):
        r, c = divmod(i, S)
        (g,) = torch.autograd.grad(out[..., r, c].sum(), x, retain_graph=True)
        seen = g.abs().sum(1).flatten()                                  # [S*S] per input pixel
        assert seen[i:].abs().max() == 0, f"pixel {i} sees pixels at/after itself: {seen[i:].nonzero().flatten().tolist()}"
        if i > 0:
            assert seen[:i].abs().max() > 0


# ------------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name,kw", [("vae", {}), ("gan", {}), ("pixelcnn", {}), ("ddpm", {"sampler": "ddim"}),
                                     ("ddpm", {"sampler": "ddpm"})])
def test_samplers_shape_range_and_seed(name, kw):
    m = _method(name).eval()
    a = m.sample(3, generator=torch.Generator().manual_seed(0), **kw)
    b = m.sample(3, generator=torch.Generator().manual_seed(0), **kw)
    c = m.sample(3, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_likelihood_models_report_bits_per_dim():
    x = LEVELS[torch.randint(0, 256, (2, 3, 8, 8))]
    for name in ("vae", "pixelcnn", "ddpm"):
        bpd = _method(name).eval().bits_per_dim(x, generator=torch.Generator().manual_seed(0))
        assert bpd.shape == (2,) and torch.isfinite(bpd).all() and (bpd > 0).all(), name
    assert _method("gan").bits_per_dim(x) is None


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name,extra,match", [
    ("vae", ["data.image_size=12"], "not one of 8, 16, 32"),
    ("gan", ["data.image_size=24"], "not one of 8, 16, 32"),
    ("ddpm", ["data.image_size=10", "method.channel_mults=[1,2,2]"], "must be a multiple of 4"),
    ("vae", ["method.likelihood=bernoulli"], "likelihood must be one of logistic, gaussian"),
    ("ddpm", ["method.sample_steps=0"], r"method.sample_steps must be an integer >= 1, got 0"),
    ("ddpm", ["method.sample_steps=21"], r"step count must be in \[1, 20\]"),
    ("pixelcnn", ["method.output=mixture"], "output must be one of softmax, logistic_mixture"),
])
def test_bad_generative_settings(name, extra, match):
    cfg = load_config(None, GEN + [f"method.name={name}", "data.image_size=8", *SMALL[name], *extra])
    with pytest.raises((ValueError, ModelError), match=match):
        create_method(cfg)


def test_generative_methods_require_signed_pixels():
    with pytest.raises(ValueError, match=r"data.mean=\[0.5,0.5,0.5\]"):
        create_method(load_config(None, ["data.train=x", "method.name=vae"]))


# ------------------------------------------------------------------------------------------------ engine + CLI
def _ov(shards, run_dir, name, **kv):
    """train_overrides for a tiny generative run (its projector keys belong to SimCLR: dropped)."""
    ov = train_overrides(shards, run_dir, method__name=name, data__mean="[0.5,0.5,0.5]", data__std="[0.5,0.5,0.5]",
                         data__image_size=8, **kv)
    return [o for o in ov if not o.startswith("method.proj")] + SMALL[name]


@pytest.mark.parametrize("name,tag", [("vae", "train/loss"), ("gan", "train/d/loss"), ("pixelcnn", "train/loss"),
                                      ("ddpm", "train/loss"), ("flow", "train/loss")])
@pytest.mark.slow
def test_generative_resume_reproduces_losses(tmp_path, digits_shards, experiment, name, tag):
    ref = tmp_path / "ref"
    ov = _ov(digits_shards, ref, name, train__max_steps=4, checkpoint__every_steps=2, optim__name="adamw",
             optim__lr=0.001)
    cli("train", experiment, *ov, check=True)
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "checkpoints" / "step_00000002.pt", run_dir / "checkpoints")
    cli("train", experiment, *[o for o in ov if not o.startswith("run_dir=")], f"run_dir={run_dir}", check=True)
    want, got = tb_scalars(ref, tag), tb_scalars(run_dir, tag)
    assert sorted(got) == [3, 4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got, want)
    if name == "gan":
        g_want, g_got = tb_scalars(ref, "train/g/loss"), tb_scalars(run_dir, "train/g/loss")
        assert g_got[4] == pytest.approx(g_want[4], rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory, digits_shards, experiment):
    run_dir = tmp_path_factory.mktemp("gen") / "ddpm"
    cli("train", experiment, *_ov(digits_shards, run_dir, "ddpm", train__max_steps=3, log__sample_every_steps=3,
                                  log__sample_n=4), check=True)
    return run_dir


def test_sample_grids_in_run_dir_and_tensorboard(ddpm_run):
    assert (ddpm_run / "samples" / "step_00000003.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((ddpm_run / "tb").glob("events.*"))))
    ea.Reload()
    assert "samples" in ea.Tags()["images"]


@pytest.mark.slow
def test_sample_cli_is_reproducible(tmp_path, ddpm_run):
    from PIL import Image

    outs = []
    for i, seed in enumerate([0, 0, 1]):
        out = tmp_path / f"g{i}.png"
        cli("sample", ddpm_run, "--n", "4", "--out", out, "--seed", seed, "--steps", "3", check=True)
        outs.append(torch.from_numpy(__import__("numpy").array(Image.open(out))))
    assert outs[0].shape == (2 * 8 + 3, 2 * 8 + 3, 3)       # a 2 x 2 grid with 1-px padding
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_sample_cli_errors(tmp_path, ddpm_run, ref_run, capsys):
    def error(*args):   # `pretrain sample ...` in this process
        return inproc_error_line(capsys, "sample", *args)

    assert "step count must be in" in error(ddpm_run, "--out", tmp_path / "x.png", "--steps", "0")
    assert "no checkpoint in" in error(tmp_path / "empty", "--out", tmp_path / "x.png")
    assert "does not generate images" in error(ref_run[0], "--out", tmp_path / "x.png")
    assert "without classes" in error(ddpm_run, "--out", tmp_path / "x.png", "--class", "1")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_class_conditional_dit_flow_samples_with_guidance_from_the_cli(tmp_path, digits_shards, experiment, capsys,
                                                                     ref_run):
    """A class-conditional DiT flow trained by `pretrain train` samples a class with guidance through `pretrain
    sample --cfg --class` and is evaluated with guidance by `eval gen --cfg`; a class out of range is a one-line
    error."""
    from PIL import Image

    run = tmp_path / "flow"
    # EMA decay 0: the sampled weights are the trained ones (the DiT starts at zero output: adaLN-Zero)
    cli("train", experiment, *_ov(digits_shards, run, "flow", train__max_steps=2, optim__name="adamw", optim__lr=0.001),
        "method.ema_decay=0.0", check=True)
    out = tmp_path / "g.png"
    p = cli("sample", run, "--n", "4", "--out", out, "--cfg", "3.0", "--class", "2", check=True)
    assert "4 samples of flow" in p.stdout and Image.open(out).size == (2 * 8 + 3, 2 * 8 + 3)
    assert "--class must be in [0, 9]" in inproc_error_line(capsys, "sample", run, "--out", tmp_path / "y.png",
                                                           "--class", "10")
    feats = tmp_path / "simclr.safetensors"
    cli("export", ref_run[0], "--out", feats, check=True)
    r = [json.loads(cli("eval", "gen", "--run", run, "--features", feats, "--train", f"{digits_shards}/train", "--val",
                        f"{digits_shards}/val", "--n", "16", "--max-samples", "32", *g, check=True).stdout.splitlines()[-1])
         for g in ([], ["--cfg", "3.0"])]
    assert r[0]["method"] == "flow" and "bits_per_dim" not in r[0] and r[0]["backbones"][str(feats)]["fd"] > 0
    assert "cfg" not in r[0] and r[1]["cfg"] == 3.0   # (after 2 steps guidance moves pixels by ~1e-5: no visible change)


@pytest.mark.slow
def test_eval_gen_reports_bits_per_dim_and_frechet(tmp_path, ddpm_run, ref_run, digits_shards):
    feats = tmp_path / "simclr.safetensors"
    cli("export", ref_run[0], "--out", feats, check=True)
    p = cli("eval", "gen", "--run", ddpm_run, "--features", feats, "--train", f"{digits_shards}/train",
            "--val", f"{digits_shards}/val", "--n", "16", "--steps", "3", "--max-samples", "64", check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["method"] == "ddpm" and r["val"] == 64
    assert r["bits_per_dim"] > 0 and r["histogram_bits_per_dim"] > 0
    assert r["frechet_samples"] >= 0 and r["frechet_noise"] > 0 and r["frechet_train"] < r["frechet_noise"]
