"""Shared helpers for the test suite: running the CLI and torchrun in real subprocesses, reading logs."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"
#: registry-wide tests build methods that need a ViT (Method.requires_vit) on this one: 4x4 patches of 16 px,
#: 2 blocks, any input size (multi-crop's local crops)
SMALL_VIT = ["model.name=vit_tiny_patch16_224",
             "model.kwargs={img_size: 16, patch_size: 4, depth: 2, dynamic_img_size: true, drop_path_rate: 0.0}"]


def child_env(**extra) -> Dict[str, str]:
    """Environment for child processes: one thread each (2 cores shared by everyone), no stray
    launcher variables, tests/ importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd: Sequence[str], timeout: float = 240, check: bool = False, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(list(map(str, cmd)), cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        # under torchrun the informative lines (the ranks' errors) come before the launcher's summary
        errors = [l for l in p.stderr.splitlines() if "rror" in l or "Traceback" in l][:40]
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                             f"--- error lines of stderr\n" + "\n".join(errors) + f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


def cli(*args, timeout: float = 240, check: bool = False, **env) -> subprocess.CompletedProcess:
    """`pretrain ARGS...` in a fresh Python process."""
    return run([sys.executable, "-m", "pretrain.cli", *args], timeout=timeout, check=check, **env)


def torchrun(*args, nproc: int = 2, timeout: float = 240, check: bool = False, **env) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS...` (ARGS: a script path, or -m module ...)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
               timeout=timeout, check=check, **env)


def train_overrides(shards, run_dir, **kv) -> List[str]:
    """A tiny but real SimCLR run on the digits shards; `kv` (a__b=value for a.b=value) wins."""
    base = {
        "data.train": f"{shards}/train", "data.val": "null", "run_dir": str(run_dir),
        "model.name": "resnet10t", "data.image_size": 16, "method.proj_hidden_dim": 32, "method.proj_dim": 16,
        "train.global_batch_size": 32, "train.max_steps": 4, "data.num_workers": 0, "data.shuffle_buffer": 64,
        "log.every_steps": 1, "log.progress": "false", "checkpoint.every_steps": 1000, "optim.warmup_steps": 2,
    }
    base.update({k.replace("__", "."): v for k, v in kv.items()})
    return [f"{k}={v}" for k, v in base.items()]


def tb_scalars(run_dir, tag: str = "train/loss") -> Dict[int, float]:
    """step -> value of one scalar from every TensorBoard event file under run_dir/tb (full float32)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    files = sorted(glob.glob(str(Path(run_dir) / "tb" / "events.out.tfevents.*")))
    assert files, f"no TensorBoard event file under {run_dir}/tb"
    for f in files:
        for ev in EventFileLoader(f).Load():
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                out = {s: v for s, v in out.items() if s < ev.step}   # a resumed run's purge, as TensorBoard does it
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.tag != tag:
                    continue
                if v.HasField("simple_value"):
                    out[ev.step] = v.simple_value
                else:  # newer writers store a tensor proto
                    from tensorboard.util import tensor_util

                    out[ev.step] = float(tensor_util.make_ndarray(v.tensor))
    return out


def tmp_debris(*dirs) -> List[str]:
    """Every temporary (.tmp) file or dir left under `dirs`."""
    found = []
    for d in dirs:
        d = Path(d)
        if d.exists():
            found += [str(p) for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    return found


def error_line(p: subprocess.CompletedProcess) -> str:
    """Assert the process failed with exactly one `error: ...` line on stderr and no traceback."""
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode != 0, f"expected failure, got exit 0\nstdout: {p.stdout[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{p.stderr[-4000:]}"
    return lines[0]


def inproc_error_line(capsys, *args) -> str:
    """`pretrain ARGS` via pretrain.cli.main in this process (same code path as `cli`, minus the
    interpreter start-up): assert exit code 2 and exactly one `error: ...` line on stderr; return it.
    An exception that escapes main (a traceback, in a real run) fails the test."""
    from pretrain.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate()` until it returns something truthy (returned); fail the test after `timeout` s."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_step(run_dir) -> int:
    """The last step rank 0 logged to run_dir/log.txt (needs log.every_steps=1), 0 if none yet."""
    import re

    try:
        steps = re.findall(r"\] INFO pretrain: step (\d+) ", (Path(run_dir) / "log.txt").read_text())
    except FileNotFoundError:
        return 0
    return int(steps[-1]) if steps else 0


def worker_pids(agent_pid: int) -> Dict[int, int]:
    """{RANK: pid} of the training processes a torchrun agent started (its children with RANK set)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
