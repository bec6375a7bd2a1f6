"""`pretrain slurm CONFIG [key=value ...]`: write a SLURM batch script for a run and submit it.

The script is `launch/slurm_torchrun.sbatch` with its header and settings filled in: one `srun`
task per node starts a torchrun agent, which starts `--nproc-per-node` training processes; the
agents meet at a c10d rendezvous on the first node of the allocation. Why torchrun per node rather
than one srun task per GPU (`launch/slurm_srun.sbatch`, which pretrain.dist also supports):
`--max-restarts` restarts a crashed rank from the last checkpoint inside the allocation, without
going back through the queue; and the processes of a node are one agent's children, so a node's
workers start and stop together.

The config and overrides are loaded here, before submitting, so a typo fails at once instead of
after the job waited in the queue. The script and SLURM's log go into the run dir
(`run_dir/slurm.sbatch`, `run_dir/slurm-JOBID.out`); a requeued job appends to the same log.

`--array KEY=V1,V2 [--array KEY2=...]` submits one job array over the grid of values (their
product); each point trains in `run_dir/<i>-<key>=<value>...` and resumes on its own.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

TEMPLATE = Path(__file__).with_name("slurm_torchrun.sbatch")
BODY_MARK = "# ---- body"


class SlurmError(ValueError):
    """A submission problem the user must fix; the message says what and how."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/simclr_resnet18.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `pretrain train`")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU-only nodes (gloo)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs of each node's task (all its ranks share them)")
    g.add_argument("--mem", help="memory per node, e.g. 200G")
    g.add_argument("--partition")
    g.add_argument("--time", help="time limit, e.g. 24:00:00")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--job-name", default=None, help="default: pretrain-<run dir name>")
    g.add_argument("--dependency", help="e.g. afterok:123 (passed to sbatch)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="any other sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
    f = p.add_argument_group("faults")
    f.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue")
    f.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a crashed rank")
    s = p.add_argument_group("sweeps and submission")
    s.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a job array over these values (repeatable: the grid of all of them)")
    s.add_argument("--array-parallel", type=int, default=None, help="at most this many array tasks at once")
    s.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    s.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job to end (sbatch --wait); exit with its code")


def split_values(text: str) -> List[str]:
    """"0.1,0.3" -> ["0.1", "0.3"]; commas inside [] or {} stay: "[1,2],[3,4]" -> 2 values."""
    out, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += (ch in "[{") - (ch in "]}")
        cur += ch
    return out


def sweep_points(specs: Sequence[str]) -> List[List[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = split_values(values) if sep else []
        if not key or not vals or any(v == "" for v in vals):
            raise SlurmError(f"--array {spec!r} is not KEY=V1,V2,...; e.g. --array optim.lr=0.1,0.3")
        axes.append([f"{key}={v}" for v in vals])
    return [list(p) for p in itertools.product(*axes)] if axes else []


def point_name(i: int, point: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", f"{i}-" + "-".join(point))[:120]


def _check(config: str, overrides: Sequence[str], world: int):
    """Load the config as the job will (errors now, not after the queue); returns it."""
    from pretrain.config import batch_split, load_config

    cfg = load_config(config, overrides)
    batch_split(cfg, world)
    return cfg


def plan_jobs(a) -> tuple:
    """-> (run_dir, [ARGS of each array task, or of the one job]) with absolute paths."""
    for name in ("nodes", "nproc_per_node"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SlurmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be >= 0, got {a.gpus_per_node}")
    world = a.nodes * a.nproc
    config = str(Path(a.config).resolve())
    cfg = _check(config, a.overrides, world)
    run_dir = Path(cfg.run_dir).resolve()
    base = [config, *[o for o in a.overrides if not o.startswith("run_dir=")]]
    points = sweep_points(a.array)
    if not points:
        return run_dir, [[*base, f"run_dir={run_dir}"]]
    jobs = []
    for i, point in enumerate(points):
        args = [*base, *point]
        if not any(p.startswith("run_dir=") for p in point):
            args.append(f"run_dir={run_dir / point_name(i, point)}")
        _check(config, args[1:], world)
        jobs.append(args)
    return run_dir, jobs


def render(a, run_dir: Path, jobs: List[List[str]]) -> str:
    """The batch script: #SBATCH header from the options, settings, then the template's body."""
    array = len(jobs) > 1 or bool(a.array)
    sb = {
        "job-name": a.job_name or f"pretrain-{run_dir.name}",
        "nodes": a.nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": a.gpus_per_node or None,
        "cpus-per-task": a.cpus_per_task,
        "mem": a.mem,
        "partition": a.partition,
        "time": a.time,
        "account": a.account,
        "qos": a.qos,
        "dependency": a.dependency,
        "array": f"0-{len(jobs) - 1}" + (f"%{a.array_parallel}" if a.array_parallel else "") if array else None,
        "signal": f"USR1@{a.signal_seconds}",
        "requeue": True,
        "open-mode": "append",
        "chdir": os.getcwd(),   # relative data paths in the config resolve as they did here
        "output": str(run_dir / ("slurm-%A_%a.out" if array else "slurm-%j.out")),
    }
    lines = ["#!/bin/bash", f"# written by `pretrain slurm` from {TEMPLATE.name}; edit and `sbatch` it again to resubmit"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in sb.items() if v is not None]
    lines += [f"#SBATCH {extra}" for extra in a.sbatch_arg]
    lines += ["", f"PYTHON={shlex.quote(a.python)}", f"NPROC_PER_NODE={a.nproc}", f"MAX_RESTARTS={a.max_restarts}"]
    quoted = [" ".join(shlex.quote(x) for x in args) for args in jobs]
    if array:
        lines += ['case "$SLURM_ARRAY_TASK_ID" in']
        lines += [f"  {i}) ARGS=({q}) ;;" for i, q in enumerate(quoted)]
        lines += ['  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    else:
        lines += [f"ARGS=({quoted[0]})"]
    text = TEMPLATE.read_text()
    return "\n".join(lines) + "\n\n" + text[text.index(BODY_MARK):]


def submit(a) -> int:
    a.nproc = a.nproc_per_node or a.gpus_per_node or 1
    run_dir, jobs = plan_jobs(a)
    script = render(a, run_dir, jobs)
    if a.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise SlurmError("sbatch not found: run `pretrain slurm` on a SLURM login node, or use --dry-run to see the script")
    from pretrain.utils import atomic_write_text

    path = run_dir / "slurm.sbatch"
    atomic_write_text(path, script)   # SLURM writes its log into run_dir: it must exist first
    cmd = [sbatch, "--parsable", *(["--wait"] if a.wait else []), str(path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    if a.wait:   # sbatch --wait prints the id at submission, then blocks: report the id right away
        job = p.stdout.readline().strip().split(";")[0]
        if job:
            print(f"submitted job {job}; waiting for it to end (log: {_log(run_dir, job, len(jobs))})", flush=True)
    out, err = p.communicate()
    job = job or out.strip().split(";")[0]
    if not job:   # refused at submission: nothing was queued
        raise SlurmError(f"sbatch refused the job: {_reason(err)}; fix the resources asked for (see `sinfo` "
                         f"for partitions and node counts) or check {path} with --dry-run")
    if a.wait:
        print(f"job {job} ended with exit code {p.returncode}; log: {_log(run_dir, job, len(jobs))}")
        return p.returncode
    n = f"{len(jobs)} array tasks" if len(jobs) > 1 else "job"
    print(f"submitted {n} {job}: script {path}, log {_log(run_dir, job, len(jobs))}")
    return 0


def _log(run_dir: Path, job: str, n: int) -> str:
    return str(run_dir / (f"slurm-{job}_*.out" if n > 1 else f"slurm-{job}.out"))


def _reason(stderr: str) -> str:
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    errors = [l.split("error:", 1)[-1].strip() for l in lines if "error" in l.lower()]
    return errors[-1] if errors else (lines[-1] if lines else "no message")
