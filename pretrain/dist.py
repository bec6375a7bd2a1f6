"""The distributed environment, in one place: torchrun variables, SLURM variables, or one process.

torchrun (and the `deepspeed` / `accelerate` launchers) set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Under `srun` with one task per GPU we derive the same from
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from pretrain import comm


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"   # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM hostlist -> hostnames: "gpu[01-03,07],login1" -> [gpu01, gpu02, gpu03, gpu07, login1]."""
    hosts, depth, cur = [], 0, ""
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if cur:
                hosts.extend(_expand_host(cur))
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    return hosts


def _expand_host(pattern: str) -> List[str]:
    m = re.search(r"\[([^\]]+)\]", pattern)
    if not m:
        return [pattern]
    head, tail, out = pattern[:m.start()], pattern[m.end():], []
    for part in m.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [f"{head}{str(i).zfill(len(lo))}{tail}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(f"{head}{part}{tail}")
    return [h for o in out for h in _expand_host(o)]


def env_from(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the environment a launcher set up (torchrun wins over SLURM)."""
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        nodes = expand_nodelist(e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST", "127.0.0.1"))
        port = int(e.get("MASTER_PORT", 20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       e.get("MASTER_ADDR", nodes[0]), port, "slurm")
    return DistEnv()


def init_distributed(env: DistEnv, backend: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join the process group (when world_size > 1) and return this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not comm.initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                          WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        # the backend's own collective timeout is a backstop: pretrain.engine.faults.Watchdog fires
        # first (after timeout_s) and says which rank is behind
        timeout = timedelta(seconds=timeout_s + max(60.0, 0.1 * timeout_s))
        dist.init_process_group(backend, store=_attempt_store(env, timeout), rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    return device


def _attempt_store(env: DistEnv, timeout: timedelta):
    """Under torchrun: its store, with keys of this restart attempt's own (None otherwise: env://).

    torchrun keeps one key-value store across `--max-restarts` restarts, and the process group's
    keys carry no attempt number, so a restarted rank can read the address a dead rank of the
    previous attempt published and fail with "Connection refused" (seen with torch 2.15)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pretrain/attempt_{attempt}", store)


def cleanup() -> None:
    """Tear the process group down on every rank together.

    The barrier matters with gloo: a rank that destroys its group while a peer is still busy (e.g.
    rank 0 writing a file) can make the peer's transport thread abort the process at exit."""
    if comm.initialized():
        try:
            comm.barrier()
        finally:
            # DeepSpeed keeps its own clones of the world group; its destroy releases them too, or the next engine
            # made in this process (a notebook, the tests) fails on a group that is "not registered".
            ds = sys.modules.get("deepspeed.comm")
            if ds is not None and ds.is_initialized():
                ds.destroy_process_group()
            else:
                dist.destroy_process_group()
