"""Metrics comparable with papers (`pretrain eval gen --inception / --features`): Inception weights read safely and
checked, FID / IS equal to torch-fidelity's own on the same features, precision/recall against a brute-force
float64 reference, the CLI's errors, and sharded (torchrun) evaluation equal to one process."""
from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch

from helpers import cli, inproc_error_line, torchrun, train_overrides
from pretrain.evaluation import fidelity as fi
from pretrain.evaluation.generative import frechet_distance


def _kaiming(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights that keep activations O(1) through the 90-odd layers (so the features are not ~0), and a
    classifier with large enough logits that the Inception Score is not 1."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel())
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return net


@torch.no_grad()
def _spread_logits(net: torch.nn.Module, pool_fn) -> torch.nn.Module:
    """Random pool features share a large common part: take it out of fc's rows and scale them, so the logits differ
    between images (an Inception Score above 1)."""
    pool = pool_fn(_images(4, 99)).double()                                # [4, 2048]
    m = pool.mean(0)
    w = net.fc.weight.double()
    w = w - (w @ m)[:, None] * m[None] / m.dot(m)                           # rows orthogonal to the mean feature
    net.fc.weight.data = (w * 2 / ((pool - m) @ w.t()).std().clamp_min(1e-12)).float()
    return net


def _fidelity_random(monkeypatch) -> torch.nn.Module:
    """torch-fidelity's own InceptionV3 with random weights (its loader stubbed out: nothing downloaded)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("ref", ["2048", "logits_unbiased"])
    net = _kaiming(net, 0).eval()
    return _spread_logits(net, lambda x: net(x)[0])


@pytest.fixture(scope="module")
def fidelity_pth(tmp_path_factory):
    """(path of a random pt_inception-format .pth, the package's model with those weights)."""
    mp = pytest.MonkeyPatch()
    try:
        net = _fidelity_random(mp)
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _images(n, seed, size=16):
    """uint8 [n, 3, size, size]: noise of a random colour and contrast per image (diverse features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 1, 1, generator=g) * 255 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 127 * \
        torch.rand(n, 3, size, size, generator=g)
    return x.clamp(0, 255).to(torch.uint8)


def _package_fid_is(real_pool, fake_pool, fake_logits):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    fid = fid_statistics_to_metric(fid_features_to_statistics(real_pool.double()),
                                   fid_features_to_statistics(fake_pool.double()), verbose=False)[KEY_METRIC_FID]
    return fid, isc_features_to_metric(fake_logits.double(), splits=2)[KEY_METRIC_ISC_MEAN]


def test_fidelity_weights_give_the_packages_features_fid_and_is(fidelity_pth):
    path, ref = fidelity_pth
    net = fi.load_inception(path)
    assert net.standard
    real, fake = _images(8, 0), _images(8, 1) // 2 + 64          # two different image distributions
    (rp, rl), (fp, fl) = net(real), net(fake)
    with torch.no_grad():
        want_pool, want_logits = ref(fake)                       # the package's model, the same weights
    assert rp.shape == (8, 2048) and fl.shape == (8, 1008) and rp.std() > 1e-3
    assert torch.equal(fp, want_pool) and torch.equal(fl, want_logits)
    fid, isc = _package_fid_is(rp, fp, fl)
    # rel 1e-5: ours takes the eigenvalues of the symmetric S_a^1/2 S_b S_a^1/2, the package those of S_a S_b; with
    # few samples in 2048 dims both are rank-deficient and the two forms round their ~0 eigenvalues apart
    assert frechet_distance(rp, fp) == pytest.approx(fid, rel=1e-5)
    assert fi.inception_score(fl, splits=2)[0] == pytest.approx(isc, rel=1e-12) and isc > 1.01


def _tv_input(u8):
    """torchvision's ImageNet input: 299 px (bilinear), ImageNet mean/std."""
    x = torch.nn.functional.interpolate(u8.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_torchvision_inception_from_safetensors(tmp_path):
    """torchvision's architecture (1000 classes, AuxLogits): pool features and logits as its own forward gives them."""
    import torchvision
    from safetensors.torch import save_file

    tv = _kaiming(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False,
                                                  transform_input=True), 1).eval()   # as torchvision's weights
    pool = {}
    hook = tv.avgpool.register_forward_hook(lambda m, i, o: pool.update(x=o.flatten(1)))
    _spread_logits(tv, lambda u8: tv(_tv_input(u8)) is not None and pool["x"])
    hook.remove()
    path = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    net = fi.load_inception(path)
    assert not net.standard
    real, fake = _images(8, 2), _images(8, 3) // 2
    (rp, _), (fp, fl) = net(real), net(fake)
    with torch.no_grad():
        logits = tv(_tv_input(fake))                             # eval mode: a plain tensor [8, 1000]
    assert fl.shape == (8, 1000) and torch.allclose(fl + tv.fc.bias, logits, rtol=1e-4, atol=1e-4)
    fid, isc = _package_fid_is(rp, fp, fl)
    # rel 1e-5: ours takes the eigenvalues of the symmetric S_a^1/2 S_b S_a^1/2, the package those of S_a S_b; with
    # few samples in 2048 dims both are rank-deficient and the two forms round their ~0 eigenvalues apart
    assert frechet_distance(rp, fp) == pytest.approx(fid, rel=1e-5)
    assert fi.inception_score(fl, splits=2)[0] == pytest.approx(isc, rel=1e-12) and isc > 1.01


def test_weights_with_a_wrong_key_or_shape_are_refused(tmp_path, fidelity_pth):
    sd = torch.load(fidelity_pth[0], weights_only=True)
    bad = dict(sd)
    bad["Mixed_6b.branch7x7_1.conv.weightx"] = bad.pop("Mixed_6b.branch7x7_1.conv.weight")
    torch.save(bad, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"key Mixed_6b.branch7x7_1.conv.weight of torch-fidelity's InceptionV3 is missing"):
        fi.load_inception(tmp_path / "renamed.pth")
    bad = dict(sd, **{"fc.weight": torch.zeros(10, 2048)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"fc.weight has shape \[10, 2048\], torch-fidelity's InceptionV3 needs \[1008, 2048\]"):
        fi.load_inception(tmp_path / "shape.pth")
    no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}   # absent in some exports: fine
    torch.save(no_nbt, tmp_path / "nbt.pth")
    assert fi.load_inception(tmp_path / "nbt.pth").standard


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PRETRAIN_TEST_MARKER', '/nonexistent/x')}",))


class _Obj:   # a plain class instance: not a tensor either
    pass


@pytest.mark.parametrize("payload", ["reduce", "instance"])
def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch, capsys, payload):
    marker = tmp_path / "ran"
    monkeypatch.setenv("PRETRAIN_TEST_MARKER", str(marker))
    path = tmp_path / "inception.pth"
    if payload == "reduce":
        path.write_bytes(pickle.dumps({"fc.weight": _Evil()}))
    else:
        torch.save({"fc.weight": _Obj()}, path)
    line = inproc_error_line(capsys, "eval", "gen", "--run", tmp_path / "norun", "--inception", path,
                             "--train", "x", "--val", "x")
    assert "is not a plain weights file" in line and "Unpickl" in line, line
    assert not marker.exists()


def test_missing_inception_is_a_one_line_error(tmp_path, capsys):
    line = inproc_error_line(capsys, "eval", "gen", "--run", tmp_path, "--metrics", "fid", "--train", "x", "--val", "x")
    assert fi.INCEPTION_URL in line and "--inception PATH" in line


# ------------------------------------------------------------------------------------------------ precision/recall
def _brute_force_pr(real, fake, k=3):
    """Kynkaenniemi et al. 2019 by loops over points, in Python floats (float64)."""
    real, fake = real.double().tolist(), fake.double().tolist()

    def radii(xs):   # distance to the k-th nearest other point
        return [sorted(math.dist(x, y) for j, y in enumerate(xs) if j != i)[k - 1] for i, x in enumerate(xs)]

    def share(xs, centres, rs):
        return sum(any(math.dist(x, c) <= r for c, r in zip(centres, rs)) for x in xs) / len(xs)

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_against_brute_force_and_the_package():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 5, generator=g), torch.randn(33, 5, generator=g) * 0.7 + 0.5
    p, r = fi.precision_recall(real, fake, chunk=7)               # chunked: rows split over several cdist calls
    bp, br = _brute_force_pr(real, fake)
    assert (p, r) == (pytest.approx(bp, abs=1e-12), pytest.approx(br, abs=1e-12)) and 0 < p < 1 and 0 < r < 1
    assert (p, r) == pytest.approx(calculate_precision_recall_full(fake.double(), real.double(), 3), abs=1e-6)  # its float32 mean
    assert fi.precision_recall(real, real.clone()) == (1.0, 1.0)
    shifted, _ = fi.precision_recall(real, real + 3.0)
    assert shifted < 0.5
    with pytest.raises(ValueError, match="needs more than 3"):
        fi.precision_recall(real, fake[:3])


# ------------------------------------------------------------------------------------------------ sharded CLI
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, digits_shards, experiment):
    run_dir = tmp_path_factory.mktemp("fid") / "vae"
    ov = train_overrides(digits_shards, run_dir, method__name="vae", data__mean="[0.5,0.5,0.5]",
                         data__std="[0.5,0.5,0.5]", data__image_size=8, train__max_steps=2)
    ov = [o for o in ov if not o.startswith("method.proj")] + ["method.latent_dim=8", "method.decoder_width=8"]
    cli("train", experiment, *ov, check=True)
    feats = run_dir.parent / "encoder.safetensors"
    cli("export", run_dir, "--out", feats, check=True)
    return run_dir, feats


@pytest.mark.slow
def test_sharded_eval_gen_equals_one_process(vae_run, fidelity_pth, digits_shards):
    run_dir, feats = vae_run
    base = ["eval", "gen", "--run", run_dir, "--train", f"{digits_shards}/train", "--val", f"{digits_shards}/val",
            "--max-samples", "11", "--n", "9", "--batch-size", "4", "--features", feats]
    # all metrics but Inception-FID, whose 2048-d matrix square root takes 20-35 s on a busy 2-core machine; it is
    # frechet_distance of the same gathered Inception features that IS and precision/recall below see equal
    args = base + ["--seed", "5", "--inception", fidelity_pth[0], "--metrics", "bpd", "is", "fd", "pr"]
    one = json.loads(cli(*args, check=True).stdout.strip().splitlines()[-1])
    # `--`: torchrun's own parser would take --run / --n for abbreviations of its --run-path / --nnodes (it drops the --)
    p = torchrun("-m", "pretrain.cli", "--", *args, check=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, p.stdout                              # rank 0 prints, rank 1 does not
    two = json.loads(lines[0])
    assert two["ranks"] == 2 and one["ranks"] == 1 and one["samples"] == 9 and one["val"] == 11
    assert two["samples_sha256"] == one["samples_sha256"]         # the same 9 samples, bit for bit
    assert "fid" not in one and one["inception_score"] > 1
    for key in ("inception_score", "inception_score_std", "bits_per_dim"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    for space in (two["inception"], two["backbones"][str(feats)]):
        assert set(space) >= {"precision", "recall"}
    b1, b2 = one["backbones"][str(feats)], two["backbones"][str(feats)]
    for key in ("fd", "fd_noise", "fd_train", "precision", "recall"):
        assert b2[key] == pytest.approx(b1[key], rel=1e-4), key
    assert (one["inception"]["precision"], one["inception"]["recall"]) == (two["inception"]["precision"],
                                                                          two["inception"]["recall"])
    assert one["frechet_samples"] == b1["fd"] and b1["fd_noise"] > b1["fd_train"]
    other = json.loads(cli(*base, "--seed", "6", check=True).stdout.strip().splitlines()[-1])
    assert other["samples_sha256"] != one["samples_sha256"]
