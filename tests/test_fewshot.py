"""`pretrain eval fewshot` and `pretrain eval all`: stratified seeded N-shot sampling, the Student-t interval
against an independent mpmath computation, end to end on the digits shards, one-line errors."""
from __future__ import annotations

import json
import math
import statistics

import mpmath
import pytest
import torch

from helpers import inproc_error_line
from pretrain.cli import main
from pretrain.evaluation import fewshot as fs
from pretrain.evaluation.fewshot import check_shots, fewshot, mean_ci, sample_shots
from test_warm_start import RESNET, _exported

SCHEMA = ["eval", "backbone", "top1", "shots", "seeds", "std", "ci95", "train", "val"]


def _labels():
    """[75] labels, 10 classes of 3..12 samples, shuffled."""
    y = torch.cat([torch.full((3 + c,), c) for c in range(10)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


def test_sample_shots_exactly_n_per_class_seeded():
    y = _labels()
    for n in (1, 3):
        idx = sample_shots(y, n, seed=0)
        assert len(idx) == 10 * n and len(set(idx.tolist())) == len(idx)
        assert torch.bincount(y[idx], minlength=10).tolist() == [n] * 10
        assert torch.equal(idx, sample_shots(y, n, seed=0))   # same seed, same draw
    draws = {tuple(sample_shots(y, 3, seed=s).tolist()) for s in range(5)}
    assert len(draws) == 5   # other seeds, other draws


def test_sample_shots_uniform_within_a_class():
    """Every sample of a class is picked with probability n / n_c (2000 draws, 4 sigma)."""
    y, n, draws = _labels(), 2, 2000
    hits = torch.zeros(len(y))
    for s in range(draws):
        hits[sample_shots(y, n, s)] += 1
    counts = torch.bincount(y)
    p = n / counts[y].double()                                  # [75] each sample's chance per draw
    assert ((hits - draws * p).abs() <= 4 * (draws * p * (1 - p)).sqrt() + 1).all()


def _t_quantile(p, df):
    """Student t quantile by root-finding on its CDF through the regularised incomplete beta (mpmath)."""
    cdf = lambda x: 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2   # noqa: E731
    return float(mpmath.findroot(lambda x: cdf(x) - p, 2))


def test_confidence_interval_against_independent_t():
    values = [0.5, 0.6, 0.55, 0.65, 0.7]
    mean, std, (lo, hi) = mean_ci(values)
    assert math.isclose(_t_quantile(0.975, 4), 2.776445105, rel_tol=1e-9)   # the t table's value
    half = _t_quantile(0.975, 4) * statistics.stdev(values) / math.sqrt(5)
    assert math.isclose(mean, 0.6, rel_tol=1e-12) and math.isclose(std, statistics.stdev(values), rel_tol=1e-12)
    assert math.isclose(lo, 0.6 - half, rel_tol=1e-9) and math.isclose(hi, 0.6 + half, rel_tol=1e-9)
    assert math.isclose(half, 0.0981622, rel_tol=1e-6)   # by hand: 2.776445 * 0.0790569 / sqrt(5)
    m2, s2, ci2 = mean_ci([0.25, 0.75])
    assert math.isclose(ci2[1] - m2, _t_quantile(0.975, 1) * s2 / math.sqrt(2), rel_tol=1e-9)
    assert mean_ci([0.4]) == (0.4, None, None)


def test_probe_fits_on_the_sampled_shots_only(monkeypatch):
    seen = []

    def probe(tf, ty, vf, vy, seed=0, **kw):
        seen.append((torch.bincount(ty, minlength=10).tolist(), len(vf), seed))
        return 0.5 + 0.01 * seed

    monkeypatch.setattr(fs, "linear_probe", probe)
    y = _labels()
    out = fewshot(torch.randn(len(y), 4), y, torch.randn(7, 4), torch.zeros(7, dtype=torch.long), shots=(1, 2),
                  seeds=[3, 4, 5])
    assert [s for s in seen] == [([n] * 10, 7, s) for n in (1, 2) for s in (3, 4, 5)]
    assert [(r["shots"], r["seeds"], r["train"]) for r in out] == [(1, 3, 10), (2, 3, 20)]
    assert math.isclose(out[0]["top1"], 0.54) and out[0]["ci95"][0] < 0.54 < out[0]["ci95"][1]


def test_check_shots_errors():
    y = _labels()
    with pytest.raises(ValueError, match=r"--shots 4 needs 4 training images of every class, but class 0 \('zero'\) "
                                         r"has only 3 in --train; use --shots of at most 3"):
        check_shots(y, [1, 4], ["zero"] + [str(i) for i in range(1, 10)])
    with pytest.raises(ValueError, match="have no .cls label"):
        check_shots(torch.tensor([0, 1, -1]), [1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        check_shots(torch.zeros(5, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="--shots must be >= 1"):
        fewshot(torch.randn(len(y), 2), y, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), shots=[0])
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        fewshot(torch.randn(len(y), 2), y, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), seeds=[])


def _run(capsys, *args):
    """`pretrain eval ARGS` in this process -> (JSON lines of stdout, stderr)."""
    capsys.readouterr()
    assert main(["eval", *map(str, args)]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_cli_fewshot_raw_pixels(digits_shards, capsys):
    lines, _ = _run(capsys, "fewshot", "--raw-pixels", "--train", digits_shards / "train", "--val",
                    digits_shards / "val", "--shots", 1, 10, "--seeds", 3, "--epochs", 30)
    assert [list(r) for r in lines] == [SCHEMA, SCHEMA]
    one, ten = lines
    assert (one["shots"], one["seeds"], one["train"], one["val"]) == (1, 3, 10, 180) and ten["train"] == 100
    for r in lines:
        assert r["eval"] == "fewshot" and r["backbone"] == "raw pixels" and r["std"] > 0
        assert r["ci95"][0] < r["top1"] < r["ci95"][1]
    assert one["top1"] + 0.15 < ten["top1"]   # ten digits per class teach more than one (measured: 0.43 vs 0.83)


def test_cli_all_on_an_exported_backbone(tmp_path, digits_shards, capsys):
    """`eval all` prints kNN, linear and few-shot lines (each equal to its own command's) and a table on stderr."""
    _, out = _exported(tmp_path, RESNET)
    common = ["--backbone", out, "--train", digits_shards / "train", "--val", digits_shards / "val", "--epochs", 20]
    lines, err = _run(capsys, "all", *common, "--shots", 2, "--seeds", 2)
    assert [r["eval"] for r in lines] == ["knn", "linear", "fewshot"] and list(lines[2]) == SCHEMA
    assert all(r["backbone"] == str(out) and r["val"] == 180 for r in lines)
    assert lines[0]["train"] == lines[1]["train"] == 1617 and lines[2]["train"] == 20
    for r in lines:
        alone, _ = _run(capsys, r["eval"], *common, *(["--shots", 2, "--seeds", 2] if r["eval"] == "fewshot" else []))
        assert alone == [r]
    table = err.strip().splitlines()[-4:]
    assert table[0].split()[:2] == ["eval", "top1"] and table[3].startswith("fewshot 2-shot")
    assert f"{lines[2]['top1']:.4f}" in table[3] and f"{lines[0]['top1']:.4f}" in table[1]


@pytest.mark.parametrize("args,want", [
    (["fewshot", "--raw-pixels", "--shots", "1", "500"], "--shots 500 needs 500 training images of every class, "
                                                         "but class 8 ('8') has only 152 in --train"),
    (["fewshot", "--raw-pixels", "--shots", "0"], "--shots must be >= 1"),
    (["all", "--raw-pixels", "--seeds", "0"], "--seeds must be >= 1"),
    (["knn", "--raw-pixels", "--finetune"], "--finetune fine-tunes an exported backbone in `pretrain eval all"),
    (["all", "--raw-pixels", "--finetune", "configs/finetune_digits.yaml"], "--finetune fine-tunes an exported"),
    (["all", "--raw-pixels", "train.epochs=2"], "train.epochs=2: key=value arguments override the fine-tuning"),
])
def test_cli_one_line_errors(digits_shards, capsys, args, want):
    line = inproc_error_line(capsys, "eval", *args, "--train", digits_shards / "train", "--val", digits_shards / "val")
    assert want in line


@pytest.mark.slow
def test_cli_all_with_finetune(tmp_path, digits_shards, capsys):
    """`eval all --finetune CONFIG key=value...`: a fourth line from `pretrain finetune` (pretrain.finetune.run)."""
    _, out = _exported(tmp_path, RESNET)
    lines, err = _run(capsys, "all", "--backbone", out, "--train", digits_shards / "train", "--val", digits_shards / "val",
                      "--epochs", 20, "--shots", 1, "--seeds", 2, "--finetune", "configs/finetune_digits.yaml",
                      "train.max_steps=2", "train.global_batch_size=16", f"run_dir={tmp_path / 'ft'}",
                      "data.num_workers=0", "log.progress=false")
    assert [r["eval"] for r in lines] == ["knn", "linear", "fewshot", "finetune"]
    ft = lines[3]
    assert ft["backbone"] == str(out) and 0 <= ft["top1"] <= 1 and ft["val"] == 180
    assert err.strip().splitlines()[-1].startswith("finetune")
