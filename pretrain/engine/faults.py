"""Surviving faults: preemption signals (stop together, checkpoint, requeue) and a watchdog that
turns a hung rank into a clear error naming it.

Preemption. SLURM sends SIGUSR1 `--signal=USR1@S` seconds before the time limit (and on
`scancel --signal=USR1`); schedulers and `torchrun` send SIGTERM before they kill. Any rank may get
the signal, at any point of a step, so ranks must agree on *which* step is the last: each step
every rank adds its flag to an all-reduce on a small gloo group of its own (a CPU tensor: no CUDA
sync, and no interleaving with the training collectives), started asynchronously after step s and
read after step s+1. So all ranks stop after the same step, at most one step after the signal, and
the wait costs nothing in steady state. Then the loop writes a checkpoint, and rank 0 alone asks
SLURM to requeue the job (`scontrol requeue`) while the others wait at a barrier.

Watchdog. NCCL and gloo time a stuck collective out (eventually) but do not say which rank is
behind. Every rank notes where it is in the loop (step and stage, a Python assignment), and a
thread publishes it to the process group's key-value store. When a rank has not moved on for
`dist.timeout_s`, it reads everyone's notes, logs which rank is behind (in `data`, or at an
earlier step, or silent), and ends the process, which ends the job (or lets `torchrun
--max-restarts` restart it from the last checkpoint).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from pretrain import comm
from pretrain.engine.logger import log


def _signum(name) -> int:
    name = str(name).upper()
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"preempt.signals: unknown signal {name!r}; use names like USR1, TERM, INT")
    return int(sig)


class Preemption:
    """Signal handlers plus the cross-rank agreement on the step to stop after.

    `check()` after every step returns True on every rank together once any rank got a signal."""

    def __init__(self, signals, requeue_on):
        self.signals = [_signum(s) for s in signals]
        self.requeue_on = {_signum(s) for s in requeue_on}
        self.got: Optional[int] = None       # the first signal this rank received
        self.agreed: Optional[int] = None    # the signal all ranks act on
        self._old: Dict[int, object] = {}
        self._pending = None
        self.group = None
        if comm.world_size() > 1:
            # a group of its own: gloo, so the flag is a CPU tensor whatever the training backend
            self.group = dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():   # Python allows handlers only there
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.got is None:
            self.got = signum
            log.warning("received %s: stopping after the current step with a checkpoint", signal.Signals(signum).name)

    def check(self) -> bool:
        """Call once per step on every rank. True when all ranks should stop now."""
        if self.group is None:
            self.agreed = self.got
            return self.got is not None
        if self._pending is not None:    # the all-reduce started after the previous step
            work, flag = self._pending
            work.wait()
            if flag.item() > 0:
                self.agreed = int(flag.item())
                return True
        flag = torch.tensor([self.got or 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return False

    def requeue(self) -> bool:
        """After the checkpoint: rank 0 requeues the SLURM job if the signal asks for it; every rank
        returns whether the job was requeued."""
        job = os.environ.get("SLURM_JOB_ID")
        ok = False
        if job and self.agreed in self.requeue_on and comm.is_main():
            # the array task's own id when in an array: SLURM_JOB_ID is that already
            p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            ok = p.returncode == 0
            if ok:
                log.warning("requeued SLURM job %s; it resumes from this checkpoint when it starts again", job)
            else:
                log.error("scontrol requeue %s failed (%s); resubmit the job to resume", job,
                          (p.stderr or p.stdout).strip())
        if comm.world_size() > 1:
            box = [ok]
            dist.broadcast_object_list(box, 0, group=self.group)
            ok = box[0]
        return ok

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if exc_type is None and self._pending is not None:   # after an error a peer may be gone: don't wait
            self._pending[0].wait()
        self._pending = None   # the group goes with the default one, in pdist.cleanup()


STAGES = ("data", "step", "log", "eval", "checkpoint")   # `data` is the only stage without collectives


class Watchdog:
    """Notes this rank's (step, stage), shares it through the store, and ends the process with an
    error that names the rank(s) behind when this rank makes no progress for `timeout_s`."""

    def __init__(self, timeout_s: float, rank: int, world: int, store=None):
        self.timeout, self.rank, self.world, self.store = float(timeout_s), rank, world, store
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.where = (0, "step", time.time())
        self._stop = threading.Event()
        if world > 1:   # one process has no peers to wait for; a hang there is left to the user
            threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True).start()

    def mark(self, step: int, stage: str) -> None:
        self.where = (step, stage, time.time())

    def _key(self, r: int) -> str:
        return f"pretrain/watchdog/{r}"

    def _publish(self):
        step, stage, since = self.where
        self.store.set(self._key(self.rank), f"{step} {stage} {since:.3f} {time.time():.3f} {self.host} {self.pid}")

    def _peers(self) -> Tuple[List[str], List[str]]:
        """(suspects, all): one line per rank saying where it is and since when."""
        now, rows = time.time(), []
        for r in range(self.world):
            try:
                if not self.store.check([self._key(r)]):
                    rows.append((1, -1, f"rank {r}: no heartbeat ever (never reached the training loop)"))
                    continue
                step, stage, since, seen, host, pid = self.store.get(self._key(r)).decode().split()
            except Exception as e:    # the store's host may be gone too
                rows.append((1, -1, f"rank {r}: unknown ({type(e).__name__})"))
                continue
            step, since, seen = int(step), float(since), float(seen)
            silent = now - seen > max(30.0, 3 * self._period())
            rows.append((int(stage == "data" or silent), -step,
                         f"rank {r} ({host} pid {pid}): step {step}, in {stage} for {now - since:.0f} s"
                         + (f", silent for {now - seen:.0f} s (process frozen or host gone?)" if silent else "")))
        # suspects: ranks in `data` (no collective there: the others wait for them), silent ranks,
        # and ranks at an earlier step than the furthest one
        top = min(s for _, s, _ in rows)
        suspects = [t for flag, s, t in rows if flag or s > top]
        return suspects, [t for _, _, t in rows]

    def _period(self) -> float:
        return max(0.05, min(5.0, self.timeout / 4))

    def _run(self):
        while not self._stop.wait(self._period()):
            try:
                if self.store is not None:
                    self._publish()
            except Exception:
                pass
            step, stage, since = self.where
            if time.time() - since < self.timeout:
                continue
            msg = (f"rank {self.rank}: no progress for {time.time() - since:.0f} s (dist.timeout_s={self.timeout:g}) "
                   f"at step {step}, in {stage}")
            if self.store is not None and self.world > 1:
                suspects, rows = self._peers()
                msg += ("; stuck: " + "; ".join(suspects) if suspects else
                        f"; every rank is in the same place: a collective in {stage} did not complete") + \
                    " | all ranks: " + "; ".join(rows)
            msg += ". Fix or restart the stuck rank; raise dist.timeout_s if a step, eval or checkpoint legitimately takes longer"
            log.error(msg)
            for h in log.handlers:
                h.flush()
            os._exit(124)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()


def default_store():
    """The default process group's key-value store (TCPStore under torchrun / env://), or None."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None
