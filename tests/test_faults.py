"""Faults, with real processes: preemption signals, an elastic restart after SIGKILL, a hung rank,
multi-node torchrun, and resuming on a different number of ranks (DDP and DeepSpeed ZeRO)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import (REPO, WORKERS, child_env, cli, free_port, logged_step, tb_scalars, torchrun, train_overrides,
                     wait_for, worker_pids)

pytestmark = pytest.mark.slow
STEPS, EVERY = 24, 8


def _ov(shards, run_dir, **kv):
    kv = {"train__max_steps": STEPS, "checkpoint__every_steps": EVERY, "checkpoint__keep_last": 10,
          "train__global_batch_size": 16, **kv}
    return train_overrides(shards, run_dir, **kv)


def _torchrun_popen(*args, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc-per-node={nproc}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _ckpts(run_dir):
    d = run_dir / "checkpoints"
    return sorted(f.name for f in d.iterdir() if re.match(r"^step_\d{8}(\.pt)?$", f.name)) if d.is_dir() else []


@pytest.fixture(scope="module")
def ref2(tmp_path_factory, digits_shards, experiment):
    """An uninterrupted 2-rank run of STEPS steps: the curve the faulted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref2") / "run"
    torchrun("-m", "pretrain.cli", "train", experiment, *_ov(digits_shards, run_dir), check=True)
    return tb_scalars(run_dir)


def test_preemption_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    ov = _ov(digits_shards, run_dir, train__max_steps=10_000)
    p = _torchrun_popen("--standalone", "-m", "pretrain.cli", "train", experiment, *ov)
    try:
        wait_for(lambda: logged_step(run_dir) >= 3, 120, "step 3")
        ranks = wait_for(lambda: len(worker_pids(p.pid)) == 2 and worker_pids(p.pid), 10, "2 workers")
        os.kill(ranks[1], signal.SIGUSR1)         # only rank 1 hears it
        rc, out, err = _finish(p)
    finally:
        p.kill()
    # both ranks stop after the same step, with a checkpoint of it; not requeued (no SLURM): 128 + USR1
    stops = {int(r): int(s) for r, s in re.findall(r"\[rank(\d)\] WARNING pretrain: preempted by SIGUSR1 at step (\d+)", err)}
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, err[-3000:]
    stop = stops[0]
    assert 3 <= stop < 10_000 and _ckpts(run_dir) == [f"step_{stop:08d}.pt"]
    assert rc != 0 and "exitcode  : 138" in err.replace("exitcode: ", "exitcode  : "), err[-2000:]

    # the same command continues from there, to exactly the configured steps
    final = stop + 3
    torchrun("-m", "pretrain.cli", "train", experiment, *_ov(digits_shards, run_dir, train__max_steps=final), check=True)
    assert f"resumed from step {stop}" in (run_dir / "log.txt").read_text()
    assert _ckpts(run_dir)[-1] == f"step_{final:08d}.pt"
    assert sorted(tb_scalars(run_dir)) == list(range(1, final + 1))


def test_elastic_restart_after_sigkill_continues_the_loss_curve(tmp_path, digits_shards, experiment, ref2):
    run_dir = tmp_path / "run"
    p = _torchrun_popen("-m", "pretrain.cli", "train", experiment, *_ov(digits_shards, run_dir),
                        extra=["--standalone", "--max-restarts=1"])
    try:
        wait_for(lambda: logged_step(run_dir) >= EVERY + 2, 180, f"step {EVERY + 2}")
        os.kill(worker_pids(p.pid)[1], signal.SIGKILL)
        rc, out, err = _finish(p)
    finally:
        p.kill()
    assert rc == 0, err[-3000:]
    log_txt = (run_dir / "log.txt").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", log_txt)]
    assert len(resumed) == 1 and resumed[0] >= EVERY, log_txt[-2000:]   # the restart found the checkpoint
    assert _ckpts(run_dir)[-1] == f"step_{STEPS:08d}.pt"
    # one value per step (the restart's purge drops the steps it re-ran), equal to the uninterrupted run's
    got = tb_scalars(run_dir)
    assert sorted(got) == sorted(ref2) == list(range(1, STEPS + 1))
    for s in ref2:
        assert got[s] == pytest.approx(ref2[s], rel=1e-5, abs=1e-6), s


def test_two_torchrun_nodes_with_c10d_rendezvous_match_one_node(tmp_path, digits_shards, experiment, ref2):
    """Two `torchrun --nnodes 2` agents on this machine meeting at a c10d rendezvous: world size 2,
    the same losses as 2 processes under one agent."""
    run_dir = tmp_path / "run"
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=mn-test"]
    nodes = [_torchrun_popen("-m", "pretrain.cli", "train", experiment, *_ov(digits_shards, run_dir),
                             nproc=1, extra=[*rdzv, f"--node-rank={i}"]) for i in range(2)]
    try:
        results = [_finish(n) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert "on 2 rank(s) (torchrun)" in (run_dir / "log.txt").read_text()
    got = tb_scalars(run_dir)
    assert sorted(got) == sorted(ref2)
    for s in ref2:
        assert got[s] == pytest.approx(ref2[s], rel=1e-5, abs=1e-6), s


def test_hung_rank_ends_with_an_error_naming_it(tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    ov = _ov(digits_shards, run_dir, train__max_steps=50, dist__timeout_s=8)
    t0 = time.monotonic()
    p = torchrun(WORKERS / "hang_rank.py", "1", "3", "train", experiment, *ov, timeout=200)
    took = time.monotonic() - t0
    assert p.returncode != 0
    # rank 0 waits in a collective of step 3 while rank 1 never gets its batch
    line = next((l for l in p.stderr.splitlines() if "[rank0] ERROR" in l), "")
    assert "no progress for" in line and "stuck: rank 1 (" in line and "in data" in line, p.stderr[-3000:]
    assert "stuck: rank 0" not in line
    assert took < 120, took   # not an endless hang: the 8 s timeout, plus start-up and teardown


_ADAM = dict(optim__name="adamw", optim__lr=1e-3, checkpoint__every_steps=4)


def _two_then_one(run_dir, shards, experiment, **kv):
    """4 steps on 2 ranks, then resumed on 1 rank to step 6; the losses logged."""
    torchrun("-m", "pretrain.cli", "train", experiment, *_ov(shards, run_dir, train__max_steps=4, **_ADAM, **kv), check=True)
    cli("train", experiment, *_ov(shards, run_dir, train__max_steps=6, **_ADAM, **kv), check=True)
    return tb_scalars(run_dir)


@pytest.fixture(scope="module")
def ddp_two_then_one(tmp_path_factory, digits_shards, experiment):
    run_dir = tmp_path_factory.mktemp("ws") / "ddp"
    return run_dir, _two_then_one(run_dir, digits_shards, experiment)


def test_ddp_resume_on_another_world_size(ddp_two_then_one):
    run_dir, losses = ddp_two_then_one
    text = (run_dir / "log.txt").read_text()
    assert "written by 2 rank(s) and this run has 1" in text and "resumed from step 4" in text
    assert _ckpts(run_dir)[-1] == "step_00000006.pt" and sorted(losses) == list(range(1, 7))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_on_another_world_size_via_universal_checkpoint(tmp_path, digits_shards, experiment, stage,
                                                                         ddp_two_then_one):
    """ZeRO shards optimizer state (ZeRO-3: weights too) by rank; a 2-rank checkpoint resumed on 1
    rank is converted to DeepSpeed's universal format once, and then continues exactly as the DDP
    run does (same weights and Adam state: DDP and ZeRO track each other in fp32)."""
    run_dir = tmp_path / "ds"
    got = _two_then_one(run_dir, digits_shards, experiment, train__backend="deepspeed", deepspeed__zero_stage=stage)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000004.universal").is_dir() and (ckpts / "step_00000006").is_dir()
    assert "converting it to DeepSpeed's universal" in (run_dir / "log.txt").read_text()
    want = ddp_two_then_one[1]
    for s in (5, 6):
        assert got[s] == pytest.approx(want[s], rel=1e-3), s
