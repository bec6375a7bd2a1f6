"""`pretrain slurm` against a real SLURM cluster on this machine (slurmctld + slurmd n1, n2, with
munge: scripts/local_slurm.py), started by this module's fixture and stopped by PID.

The cluster needs root and the Debian packages (`python scripts/local_slurm.py install`, which
scripts/test.sh runs when it can). Without them these tests skip, unless PRETRAIN_REQUIRE_SLURM=1
(set by .ci/run), where a missing cluster fails them.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess

import pytest

from helpers import REPO, child_env, cli, error_line, logged_step, tb_scalars, train_overrides, wait_for

pytestmark = pytest.mark.slow


def _local_slurm():
    spec = importlib.util.spec_from_file_location("local_slurm", REPO / "scripts" / "local_slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The client environment ({SLURM_CONF}) of a fresh 2-node cluster."""
    ls = _local_slurm()
    why = ("not root" if os.geteuid() != 0 else
           f"missing {', '.join(ls.missing_binaries())}" if ls.missing_binaries() else None)
    if why:
        msg = f"no local SLURM cluster ({why}); `sudo python scripts/local_slurm.py install` provides one"
        if os.environ.get("PRETRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    base = tmp_path_factory.mktemp("slurm")
    env = ls.up(base, nodes=2, cpus=4)
    try:
        yield env
    finally:
        ls.down(base)


def _scontrol(env, *args) -> str:
    return subprocess.run(["scontrol", *args], env=child_env(**env), capture_output=True, text=True).stdout


def _job(env, job) -> dict:
    """`scontrol show job -o JOB` as {key: value} (first record)."""
    line = _scontrol(env, "show", "job", "-o", str(job)).splitlines()
    return dict(kv.split("=", 1) for kv in line[0].split() if "=" in kv) if line else {}


def _ended(env, job, timeout: float = 300) -> dict:
    """Poll until `job` (or array task `job_i`) has ended; its `scontrol show job` record. (Faster
    than `sbatch --wait`, which polls at 2, 10, 42... s; test 1 uses that.)"""
    states = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
    return wait_for(lambda: (lambda j: j if j.get("JobState") in states else None)(_job(env, job)), timeout,
                    f"job {job} to end", interval=0.5)


def _queue(env) -> str:
    return subprocess.run(["squeue", "-h"], env=child_env(**env), capture_output=True, text=True).stdout.strip()


def _ov(shards, run_dir, **kv):
    kv = {"train__max_steps": 12, "checkpoint__every_steps": 4, "train__global_batch_size": 16, **kv}
    return train_overrides(shards, run_dir, **kv)


def _ckpts(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))


def test_two_node_job_trains_to_the_configured_steps(slurm, tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    p = cli("slurm", experiment, *_ov(digits_shards, run_dir), "--nodes", "2", "--cpus-per-task", "1", "--wait",
            timeout=300, **slurm)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    slurm_log = (run_dir / f"slurm-{job}.out").read_text()
    assert f"job {job} attempt 1 on n[1-2]: 2 node(s) x 1 rank(s)" in slurm_log, slurm_log[-3000:]
    assert "simclr on 2 rank(s) (torchrun)" in (run_dir / "log.txt").read_text()
    assert sorted(tb_scalars(run_dir)) == list(range(1, 13))
    assert _ckpts(run_dir)[-1] == "step_00000012.pt"
    assert (run_dir / "slurm.sbatch").is_file() and _job(slurm, job)["JobState"] == "COMPLETED"


def test_usr1_checkpoints_requeues_and_the_requeued_job_finishes(slurm, tmp_path, digits_shards, experiment):
    run_dir, steps = tmp_path / "run", 30
    p = cli("slurm", experiment, *_ov(digits_shards, run_dir, train__max_steps=steps, checkpoint__every_steps=10),
            "--nodes", "2", "--cpus-per-task", "1", **slurm)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    wait_for(lambda: logged_step(run_dir) >= 3, 180, "step 3 of the SLURM job")
    subprocess.run(["scancel", "--signal=USR1", job], env=child_env(**slurm), check=True)
    # SLURM holds a requeued job for ~2 minutes (BeginTime) before it may start again; cut that
    # short, so the test does not wait
    wait_for(lambda: _job(slurm, job).get("Restarts") == "1" and _job(slurm, job)["JobState"] == "PENDING",
             120, "the job to be requeued")
    _scontrol(slurm, "update", f"JobId={job}", "StartTime=now")
    info = _ended(slurm, job)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), info
    log_txt = (run_dir / "log.txt").read_text()
    stop = int(re.search(r"\[rank0\] WARNING pretrain: preempted by SIGUSR1 at step (\d+)", log_txt).group(1))
    assert 3 <= stop < steps, log_txt[-3000:]
    assert f"requeued SLURM job {job}" in log_txt and f"resumed from step {stop}" in log_txt
    slurm_log = (run_dir / f"slurm-{job}.out").read_text()   # every rank's stderr (log.txt: rank 0's)
    assert re.search(rf"\[rank1\] WARNING pretrain: preempted by SIGUSR1 at step {stop}:", slurm_log), "ranks disagree"
    assert f"job {job} attempt 1 on" in slurm_log and f"job {job} attempt 2 on" in slurm_log   # appended, not lost
    # exactly the configured steps, one loss per step across both attempts
    assert sorted(tb_scalars(run_dir)) == list(range(1, steps + 1))
    assert _ckpts(run_dir)[-1] == f"step_{steps:08d}.pt"


def test_job_array_runs_every_sweep_point(slurm, tmp_path, digits_shards, experiment):
    sweep = tmp_path / "sweep"
    p = cli("slurm", experiment, *_ov(digits_shards, sweep, train__max_steps=4), "--nodes", "1",
            "--cpus-per-task", "1", "--array", "optim.lr=0.1,0.2", **slurm)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    job = re.search(r"submitted 2 array tasks (\d+)", p.stdout).group(1)
    for i in range(2):
        assert _ended(slurm, f"{job}_{i}")["JobState"] == "COMPLETED"
    for i, lr in enumerate(["0.1", "0.2"]):
        run_dir = sweep / f"{i}-optim.lr={lr}"
        assert _ckpts(run_dir) == ["step_00000004.pt"], sorted(sweep.rglob("*"))
        assert f"\n  lr: {lr}\n" in (run_dir / "config.yaml").read_text()
        assert "on 1 rank(s) (torchrun)" in (run_dir / "log.txt").read_text()
        assert (sweep / f"slurm-{job}_{i}.out").is_file()


@pytest.mark.parametrize("opts,reason", [
    (["--nodes", "3"], "Node count specification invalid"),
    (["--nodes", "2", "--partition", "nope"], "Invalid partition name"),
])
def test_impossible_submission_is_refused_with_nothing_queued(slurm, tmp_path, digits_shards, experiment, opts, reason):
    p = cli("slurm", experiment, *_ov(digits_shards, tmp_path / "run", train__global_batch_size=24), *opts, **slurm)
    line = error_line(p)
    assert "sbatch refused the job" in line and reason in line, line
    assert _queue(slurm) == ""
