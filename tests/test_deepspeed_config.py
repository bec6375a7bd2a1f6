"""DeepSpeed's config cannot contradict the run's (issue 11, item 3): our keys are the one source of
truth for batch sizes, accumulation, clipping, precision and the ZeRO stage. deepspeed.config_file
and deepspeed.overrides may repeat them (or say "auto", as HF's DeepSpeed configs do) but a different
value is a one-line error naming both keys, and DeepSpeed optimizer/scheduler sections are refused."""
from __future__ import annotations

import json

import pytest

from helpers import cli, error_line, train_overrides
from pretrain.config import ConfigError, load_config
from pretrain.engine.backends import deepspeed_config

WORLD = 2
OURS = ["data.train=x", "optim.name=adamw", "train.global_batch_size=64", "train.grad_accum=1",
        "train.clip_grad=0", "train.precision=fp32", "deepspeed.zero_stage=2"]


def _cfg(*ov):
    return load_config(None, [*OURS, *ov])


# DeepSpeed key, a contradicting value, what the error must name on our side
CONTRADICTIONS = [
    ("gradient_accumulation_steps", 4, "train.grad_accum=1"),
    ("train_micro_batch_size_per_gpu", 8, "train.global_batch_size=64 / (2 rank(s) x train.grad_accum=1)"),
    ("train_batch_size", 128, "train.global_batch_size=64"),
    ("gradient_clipping", 1.0, "train.clip_grad=0"),
    ("zero_optimization.stage", 3, "deepspeed.zero_stage=2"),
    ("bf16.enabled", True, "train.precision=fp32"),
    ("bfloat16.enabled", True, "train.precision=fp32"),
    ("fp16.enabled", True, "train.precision=fp32"),
]


def _nested(key, value):
    *parents, leaf = key.split(".")
    d = {leaf: value}
    for p in reversed(parents):
        d = {p: d}
    return d


@pytest.mark.parametrize("key, value, ours", CONTRADICTIONS)
def test_override_contradicting_our_key_is_an_error_naming_both(key, value, ours):
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_cfg(f"deepspeed.overrides.{key}={json.dumps(value)}"), WORLD)
    msg = str(e.value)
    assert f"deepspeed.overrides.{key}={json.dumps(value)} contradicts {ours}" in msg, msg
    assert f"leave DeepSpeed's {key} out" in msg and "\n" not in msg


@pytest.mark.parametrize("key, value, ours", CONTRADICTIONS)
def test_config_file_contradicting_our_key_is_an_error_naming_both(tmp_path, key, value, ours):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, **_nested(key, value)}))
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_cfg(f"deepspeed.config_file={raw}"), WORLD)
    msg = str(e.value)
    assert f"{key}={json.dumps(value)} in deepspeed.config_file ({raw}) contradicts {ours}" in msg, msg


def test_the_issues_example_message():
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_cfg("deepspeed.overrides.gradient_accumulation_steps=4"), WORLD)
    assert str(e.value) == ("deepspeed.overrides.gradient_accumulation_steps=4 contradicts train.grad_accum=1; "
                            "set train.grad_accum and leave DeepSpeed's gradient_accumulation_steps out")


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_deepspeed_optimizer_or_scheduler_is_refused(section):
    """With our optimizer passed in, DeepSpeed ignores an `optimizer` section silently, and a
    `scheduler` section would step the learning rate that optim.* schedules."""
    with pytest.raises(ConfigError, match=f"deepspeed.overrides.{section} would fight optim"):
        deepspeed_config(_cfg(f"deepspeed.overrides.{section}.type=WarmupLR"), WORLD)


def test_compile_is_refused_rather_than_ignored():
    """train.compile is not wired into DeepSpeed's engine: an error, where before it was silently ignored."""
    with pytest.raises(ConfigError, match="train.compile=true is not wired into DeepSpeed"):
        deepspeed_config(_cfg("train.compile=true"), WORLD)
    deepspeed_config(_cfg("train.compile=false"), WORLD)


def test_equal_values_and_auto_are_ours(tmp_path):
    """Repeating our values is fine; "auto" (HF's DeepSpeed configs) is filled in from our keys."""
    want = deepspeed_config(_cfg("train.grad_accum=2", "train.clip_grad=1.5", "train.precision=bf16"), WORLD)
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                               "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                               "zero_optimization": {"stage": "auto", "overlap_comm": True}}))
    got = deepspeed_config(_cfg("train.grad_accum=2", "train.clip_grad=1.5", "train.precision=bf16",
                                f"deepspeed.config_file={raw}", "deepspeed.overrides.gradient_accumulation_steps=2",
                                "deepspeed.overrides.train_micro_batch_size_per_gpu=16",
                                "deepspeed.overrides.gradient_clipping=1.5"), WORLD)
    assert got == {**want, "zero_optimization": {"stage": 2, "overlap_comm": True}}, got


@pytest.mark.slow
def test_cli_contradiction_exits_2_with_one_error_line(tmp_path, digits_shards, experiment):
    p = cli("train", experiment, *train_overrides(digits_shards, tmp_path / "run", train__backend="deepspeed",
                                                  optim__name="adamw"),
            "deepspeed.overrides.gradient_accumulation_steps=4", timeout=200)
    line = error_line(p)
    assert p.returncode == 2, p.returncode
    assert line == ("error: deepspeed.overrides.gradient_accumulation_steps=4 contradicts train.grad_accum=1; "
                    "set train.grad_accum and leave DeepSpeed's gradient_accumulation_steps out"), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_contradiction_is_found_before_the_model_is_built(tmp_path, digits_shards, experiment, capsys, monkeypatch):
    """The DeepSpeed config is checked with the rest of the plan, not after the model is built and placed."""
    from helpers import inproc_error_line

    monkeypatch.setattr("pretrain.engine.trainer.create_method",
                        lambda cfg: pytest.fail("the DeepSpeed config must be checked before the model is built"))
    line = inproc_error_line(capsys, "train", experiment,
                             *train_overrides(digits_shards, tmp_path / "run", train__backend="deepspeed",
                                              optim__name="adamw"), "deepspeed.overrides.train_batch_size=64")
    assert "deepspeed.overrides.train_batch_size=64 contradicts train.global_batch_size=32" in line, line
