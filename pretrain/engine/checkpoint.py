"""Checkpoints: run_dir/checkpoints/step_NNNNNNNN(.pt | /), atomic, the newest K kept.

A checkpoint holds the backend state (model, optimizer, scaler, in the backend's own format: one
file under DDP, DeepSpeed's directories, a torch.distributed.checkpoint directory under FSDP2) plus client state: step, epoch, the resolved config, every rank's RNG states and the
method's extra state, and every rank's data-stream position (how many samples each loader worker's
stream had read: corrupt samples make that more than the step implies; see pretrain.data.pipeline),
so that a resumed run continues exactly.
"""
from __future__ import annotations

import random
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from pretrain import comm
from pretrain.config import ConfigError
from pretrain.engine.logger import log

PATTERN = re.compile(r"^step_(\d{8})(\.pt)?$")


class CheckpointError(RuntimeError):
    """A checkpoint the user asked for is missing or unusable."""


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporaries from an interrupted save are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The step of checkpoints/step_NNNNNNNN(.pt)."""
    return int(PATTERN.match(Path(path).name).group(1))


def find_checkpoint(path) -> Optional[Path]:
    """A run dir, a checkpoints dir, or a checkpoint itself -> the newest checkpoint, or None."""
    p = Path(path)
    if PATTERN.match(p.name) and p.exists():
        return p
    for d in (p / "checkpoints", p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    return None


def resume_target(mode, run_dir) -> Optional[Path]:
    """The checkpoint `resume` (auto | never | must | a path) continues from; None: a fresh start."""
    mode = str(mode)
    if mode == "never":
        return None
    where = Path(run_dir) if mode in ("auto", "must") else Path(mode)
    path = find_checkpoint(where)
    if path is None and mode != "auto":
        raise CheckpointError(f"no checkpoint found in {where}; train without resume=... to start fresh, "
                              f"or point resume= at a run dir that has checkpoints/step_*")
    return path


def not_continued(run_dir, target: Optional[Path]) -> List[Path]:
    """Checkpoints in run_dir/checkpoints that a run starting from `target` (None: fresh) does not
    continue: those after `target` when it is one of them, all of them otherwise."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = list_checkpoints(ckpt_dir)
    if target is not None and target.parent.resolve() == ckpt_dir.resolve():
        return [p for p in found if step_of(p) > step_of(target)]
    return found


def claim_run_dir(run_dir, resume, overwrite=None) -> Optional[Path]:
    """The run-dir rule, applied before anything is built; returns the checkpoint to resume from.

    A run dir holds one run. A run that would not continue the newest checkpoint of run_dir
    (resume=never, a checkpoint of another run, an older step of this one) while checkpoints/ holds
    checkpoints it does not continue is refused with a one-line error, unless `overwrite` is
    `archive` (they move to checkpoints.old-<UTC time>/) or `delete`. Rank 0 decides and moves or
    deletes; every rank returns (or raises) rank 0's answer, after it is done."""
    outcome = None
    if comm.is_main():
        try:
            outcome = _claim(Path(run_dir), resume, overwrite)
        except Exception as e:   # every rank must hear of it, or the others would wait in the broadcast
            outcome = e
    outcome = comm.broadcast_object(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _claim(run_dir: Path, resume, overwrite) -> Optional[Path]:
    if overwrite not in (None, "archive", "delete"):
        raise ConfigError(f"overwrite must be null, archive or delete, got {overwrite!r}")
    target = resume_target(resume, run_dir)
    old = not_continued(run_dir, target)
    if not old:
        return target
    what = f"resume={resume} starts {run_dir} " + ("afresh" if target is None else f"from step {step_of(target)}")
    names = old[0].name if len(old) == 1 else f"{old[0].name} .. {old[-1].name}"
    if overwrite is None:
        raise CheckpointError(f"{what}, but its checkpoints/ holds {len(old)} checkpoint(s) this run would not "
                              f"continue ({names}); add overwrite=archive to move them to checkpoints.old-<UTC time>/ "
                              f"(overwrite=delete: delete them), or set resume=auto to continue {old[-1].name}")
    if overwrite == "archive":
        dest = run_dir / time.strftime("checkpoints.old-%Y%m%dT%H%M%SZ", time.gmtime())
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        dest.mkdir()
    for p in old:
        for q in (p, p.with_name(p.name + ".universal")):   # with its universal conversion, if any
            if not q.exists():
                continue
            if overwrite == "archive":
                q.rename(dest / q.name)
            else:   # renamed first, so a killed delete leaves debris (cleaned by _prune), not half a checkpoint
                gone = q.rename(q.with_name(f".tmp-deleted-{q.name}"))
                shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    log.warning("%s: %s %d checkpoint(s) (%s)", what, f"moved to {dest}" if overwrite == "archive" else "deleted",
                len(old), names)
    return target


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"]["key"].numpy().astype(np.uint32), s["numpy"]["pos"], 0, 0.0))
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))


class Checkpointer:
    def __init__(self, run_dir: Path, backend, keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.backend, self.keep_last = backend, max(1, keep_last)
        self.rank, self.world = comm.world_info()

    def _path(self, step: int) -> Path:
        return self.dir / self.backend.checkpoint_name(step)

    def save(self, step: int, epoch: int, config: dict, extra: dict, data: Optional[dict] = None) -> Path:
        """Write step `step` (every rank calls this). `data`: this rank's data-stream position
        (TrainLoader.state_dict()); like the RNG states, every rank's is gathered and saved, by rank."""
        gathered = comm.all_gather_object((rng_state(), data))
        rngs, datas = [g[0] for g in gathered], [g[1] for g in gathered]
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        path = self._path(step)
        self.backend.save(path, {"step": step, "epoch": epoch, "config": config, "rng": rngs, "data": datas,
                                 "extra": extra})
        if self.rank == 0:
            self._prune(step)
        return path

    def _prune(self, step: int):
        """Keep the newest keep_last checkpoints up to `step` (the one just saved): never one of this
        run's for a later step of another (claim_run_dir keeps those out of run_dir), nor a later one."""
        for old in [p for p in list_checkpoints(self.dir) if step_of(p) <= step][:-self.keep_last]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        # debris of a save that was killed: DeepSpeed's .tmp-step_* dirs, DDP's .step_*.pt.*.tmp files;
        # universal conversions (a resume on another world size) of checkpoints pruned since
        stale = [u for u in self.dir.glob("step_*.universal") if not (self.dir / u.stem).exists()]
        for tmp in [*self.dir.glob(".tmp-*"), *self.dir.glob(".step_*.tmp"), *stale]:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def resume(self, path: Optional[Path]) -> Optional[dict]:
        """Load checkpoint `path` (claim_run_dir's answer); returns its client state, or None (fresh)."""
        if path is None:
            return None
        from pretrain.engine.backends import checkpoint_writer

        writer = checkpoint_writer(path)
        if writer is not type(self.backend):
            raise CheckpointError(f"{path} was written by train.backend={writer.name} and this run has "
                                  f"train.backend={self.backend.name}; resume with train.backend={writer.name}, or "
                                  f"export it (pretrain export) and warm-start a new run from the file")
        state = self.backend.load(path)
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            # another world size: same global batch and schedules, but each rank's share of the data
            # and its random stream are new, so the run continues correctly, not bit-identically
            log.warning("%s was written by %d rank(s) and this run has %d: resuming with the same global batch; "
                        "data order and random streams differ from an uninterrupted run", path, len(rngs), self.world)
            torch.manual_seed(hash((state["step"], self.rank, self.world)) % 2 ** 31)
        return state
