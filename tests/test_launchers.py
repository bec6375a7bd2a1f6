"""Other launchers give our engine the right ranks: `deepspeed` and `accelerate launch` start the
same 2-rank run as torchrun and produce the same losses."""
from __future__ import annotations

import sys

import pytest

from helpers import free_port, run, tb_scalars, torchrun, train_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory, digits_shards, experiment):
    run_dir = tmp_path_factory.mktemp("tr") / "run"
    torchrun("-m", "pretrain.cli", "train", experiment, *train_overrides(digits_shards, run_dir), check=True)
    return tb_scalars(run_dir)


LAUNCHERS = {
    # the deepspeed launcher on a machine without GPUs: --num_gpus is the process count
    "deepspeed": lambda port: ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", f"--master_port={port}", "--module"],
    # --multi_gpu is torchrun underneath, and works on CPU (gloo); accelerate's --cpu multi-process
    # mode goes through MPI instead, which pretrain does not read (see docs/launch.md)
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                f"--main_process_port={port}", "--module"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_runs_the_same_two_rank_training(launcher, tmp_path, digits_shards, experiment, torchrun_losses):
    pytest.importorskip(launcher)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, *LAUNCHERS[launcher](free_port()), "pretrain.cli", "train", experiment,
           *train_overrides(digits_shards, run_dir)]
    p = run(cmd, timeout=240, check=True)
    assert "on 2 rank(s)" in (run_dir / "log.txt").read_text(), p.stderr[-2000:]
    got = tb_scalars(run_dir)
    assert sorted(got) == sorted(torchrun_losses)
    for s, v in torchrun_losses.items():
        assert got[s] == pytest.approx(v, rel=1e-5, abs=1e-6), s
