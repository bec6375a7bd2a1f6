"""Every user mistake ends with exit code != 0, ONE `error: ...` line on stderr, no traceback, and no
half-written files. The cases the issue lists run `pretrain` in a real subprocess; a few extra ones
call `pretrain.cli.main` in this process (same code path, minus the interpreter start-up)."""
from __future__ import annotations

import re

import pytest

from helpers import cli, error_line, inproc_error_line, tmp_debris, torchrun, train_overrides
from pretrain.config import ConfigError, load_config


def _train(experiment, shards, run_dir, **kv):
    return cli("train", experiment, *train_overrides(shards, run_dir, **kv), timeout=120)


def _no_debris(run_dir):
    assert tmp_debris(run_dir) == []
    ck = run_dir / "checkpoints"
    assert not ck.exists() or not any(ck.iterdir()), list(ck.iterdir())


def test_missing_shard_path(tmp_path, digits_shards, experiment):
    missing = tmp_path / "nowhere" / "train"
    p = _train(experiment, digits_shards, tmp_path / "run", data__train=missing)
    line = error_line(p)
    assert str(missing) in line and "not found" in line and "data.train" in line
    _no_debris(tmp_path / "run")


def test_missing_val_shards_fail_before_training(tmp_path, digits_shards, experiment, capsys):
    missing = tmp_path / "nowhere" / "val"
    line = inproc_error_line(capsys, "train", experiment,
                             *train_overrides(digits_shards, tmp_path / "run", data__val=missing))
    assert str(missing) in line and "data.val" in line
    _no_debris(tmp_path / "run")
    # found before training started, not by the final kNN monitor after all the steps
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "tb").exists()


def test_empty_shard_dir(tmp_path, digits_shards, experiment):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(_train(experiment, digits_shards, tmp_path / "run", data__train=empty))
    assert "empty shard list" in line and str(empty) in line


def test_unknown_config_key(tmp_path, digits_shards, experiment):
    p = cli("train", experiment, *train_overrides(digits_shards, tmp_path / "run"), "train.epoch=3", timeout=120)
    line = error_line(p)
    assert "'train.epoch'" in line and "train.epochs" in line
    assert not (tmp_path / "run").exists()   # nothing is written for an invalid config


def test_unknown_method_key(tmp_path, digits_shards, experiment, capsys):
    line = inproc_error_line(capsys, "train", experiment, *train_overrides(digits_shards, tmp_path / "run"),
                             "method.temprature=0.1")
    assert "'method.temprature'" in line and "method.temperature" in line


def test_unknown_timm_model_suggests_close_name(tmp_path, digits_shards, experiment):
    line = error_line(_train(experiment, digits_shards, tmp_path / "run", model__name="resnet19"))
    assert "resnet19" in line and "resnet18" in line
    _no_debris(tmp_path / "run")


def test_missing_experiment_file(tmp_path, digits_shards, capsys):
    line = inproc_error_line(capsys, "train", tmp_path / "nope.yaml", f"data.train={digits_shards}/train")
    assert "nope.yaml" in line


def test_bad_enum_value(tmp_path, digits_shards, experiment, capsys):
    line = inproc_error_line(capsys, "train", experiment,
                             *train_overrides(digits_shards, tmp_path / "run", train__precision="fp8"))
    assert "train.precision" in line and "fp8" in line


def test_resume_must_without_checkpoint(tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    line = error_line(_train(experiment, digits_shards, run_dir, resume="must"))
    assert "no checkpoint" in line and str(run_dir) in line
    _no_debris(run_dir)


def test_export_without_checkpoint(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    (run_dir / "checkpoints").mkdir(parents=True)
    line = error_line(cli("export", run_dir, "--out", out_dir / "bb.safetensors", timeout=120))
    assert "no checkpoint" in line and str(run_dir) in line
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_eval_missing_backbone(tmp_path, digits_shards, capsys):
    line = inproc_error_line(capsys, "eval", "knn", "--backbone", tmp_path / "bb.safetensors",
                             "--train", digits_shards / "train", "--val", digits_shards / "val")
    assert "bb.safetensors" in line and "not found" in line


def test_batch_not_divisible_by_world_plan():
    from pretrain.engine import plan

    cfg = load_config(None, ["data.train=x", "data.samples_per_epoch=1000", "train.global_batch_size=30",
                             "train.grad_accum=2"])
    plan(cfg, 1)
    plan(cfg, 3)
    with pytest.raises(ConfigError) as e:
        plan(cfg, 2)
    assert "train.global_batch_size=30" in str(e.value) and "world size 2" in str(e.value)
    assert "multiple of 4" in str(e.value)


@pytest.mark.slow
def test_batch_not_divisible_by_world_under_torchrun(tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    p = torchrun("-m", "pretrain.cli", "train", experiment,
                 *train_overrides(digits_shards, run_dir, train__global_batch_size=33), timeout=150)
    assert p.returncode != 0
    # each rank prints one error line; no rank prints a traceback (torchrun's own summary aside). The
    # first rank to exit makes torchrun SIGTERM the other, which may not have printed its line yet
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and all("train.global_batch_size=33" in l and "world size 2" in l for l in errors), p.stderr
    assert not re.search(r"\[rank\d\]:.*Traceback", p.stderr), p.stderr[-4000:]
    assert "pretrain/engine" not in p.stderr   # no frames from our code
    _no_debris(run_dir)
