"""train.channels_last: NHWC conv weights train the same model as NCHW ones (DDP on 2 real ranks,
checkpoints in either layout resume in the other), and DeepSpeed, which flattens the weights back to
NCHW, refuses it."""
from __future__ import annotations

import shutil

import pytest
import torch

from helpers import tb_scalars, torchrun, train_overrides
from pretrain.config import ConfigError, load_config
from pretrain.engine.checkpoint import find_checkpoint

STEPS, EVERY = 3, 2


def _train(run_dir, digits_shards, experiment, channels_last: bool):
    ov = train_overrides(digits_shards, run_dir, train__max_steps=STEPS, checkpoint__every_steps=EVERY,
                         checkpoint__keep_last=5, train__channels_last=str(channels_last).lower())
    torchrun("-m", "pretrain.cli", "train", experiment, *ov, check=True, timeout=300)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_shards, experiment):
    return {layout: _train(tmp_path_factory.mktemp(layout) / "run", digits_shards, experiment, layout == "nhwc")
            for layout in ("nchw", "nhwc")}


def _conv_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.dim() == 4}


@pytest.mark.slow
def test_nhwc_trains_the_same_model_on_two_ranks(runs):
    want, got = tb_scalars(runs["nchw"]), tb_scalars(runs["nhwc"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in got:   # different conv kernels sum in a different order: equal to float32 rounding
        assert got[s] == pytest.approx(want[s], rel=1e-4), (s, got, want)
    assert len({round(v, 4) for v in got.values()}) > 1   # training moved
    # the layout is what the option says: NHWC strides in one run's checkpoint, NCHW in the other's
    nhwc = _conv_weights(torch.load(find_checkpoint(runs["nhwc"]), weights_only=True)["model"])
    nchw = _conv_weights(torch.load(find_checkpoint(runs["nchw"]), weights_only=True)["model"])
    assert nhwc and nhwc.keys() == nchw.keys()
    # (a 1x1 or one-input-channel kernel is both at once, so only the 3x3+ ones tell the layouts apart)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in nhwc.values())
    assert sum(not v.is_contiguous() for v in nhwc.values()) >= len(nhwc) // 2
    assert all(v.is_contiguous() for v in nchw.values())
    for k in nhwc:
        torch.testing.assert_close(nhwc[k], nchw[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
def test_nchw_checkpoint_resumes_as_nhwc(tmp_path, runs, digits_shards, experiment):
    """A run may switch layouts on resume: the step-2 NCHW checkpoint continued with channels_last
    logs the NCHW run's step-3 loss."""
    run_dir = tmp_path / "switched"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(runs["nchw"] / "checkpoints" / f"step_{EVERY:08d}.pt", run_dir / "checkpoints")
    _train(run_dir, digits_shards, experiment, channels_last=True)
    assert f"resumed from step {EVERY}" in (run_dir / "log.txt").read_text()
    got, want = tb_scalars(run_dir), tb_scalars(runs["nchw"])
    assert sorted(got) == list(range(EVERY + 1, STEPS + 1))
    assert got[STEPS] == pytest.approx(want[STEPS], rel=1e-4)


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_refused_under_deepspeed(stage, precision):
    from pretrain.engine.backends import deepspeed_config

    cfg = load_config(None, ["data.train=unused", "optim.name=adamw", "train.channels_last=true",
                             f"deepspeed.zero_stage={stage}", f"train.precision={precision}"])
    with pytest.raises(ConfigError, match="train.channels_last=true needs train.backend=ddp: .*; set "):
        deepspeed_config(cfg, 2)
    deepspeed_config(load_config(None, ["data.train=unused", "optim.name=adamw", f"deepspeed.zero_stage={stage}",
                                        f"train.precision={precision}"]), 2)   # fine without it
