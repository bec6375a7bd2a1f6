"""Checkpoints: run_dir/checkpoints/step_NNNNNNNN(.pt | /), atomic, the newest K kept.

A checkpoint holds the backend state (model, optimizer, scaler; DeepSpeed's own format under
DeepSpeed) plus client state: step, epoch, the resolved config, every rank's RNG states and the
method's extra state, and every rank's data-stream position (how many samples each loader worker's
stream had read: corrupt samples make that more than the step implies; see pretrain.data.pipeline),
so that a resumed run continues exactly.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from pretrain.engine.logger import log

PATTERN = re.compile(r"^step_(\d{8})(\.pt)?$")


class CheckpointError(RuntimeError):
    """A checkpoint the user asked for is missing or unusable."""


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporaries from an interrupted save are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


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
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def _path(self, step: int) -> Path:
        return self.dir / (f"step_{step:08d}.pt" if self.backend.name == "ddp" else f"step_{step:08d}")

    def save(self, step: int, epoch: int, config: dict, extra: dict, data: Optional[dict] = None) -> Path:
        """Write step `step` (every rank calls this). `data`: this rank's data-stream position
        (TrainLoader.state_dict()); like the RNG states, every rank's is gathered and saved, by rank."""
        mine = (rng_state(), data)
        gathered = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        rngs, datas = [g[0] for g in gathered], [g[1] for g in gathered]
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        path = self._path(step)
        self.backend.save(path, {"step": step, "epoch": epoch, "config": config, "rng": rngs, "data": datas,
                                 "extra": extra})
        if self.rank == 0:
            self._prune()
        return path

    def _prune(self):
        for old in list_checkpoints(self.dir)[:-self.keep_last]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        # debris of a save that was killed: DeepSpeed's .tmp-step_* dirs, DDP's .step_*.pt.*.tmp files;
        # universal conversions (a resume on another world size) of checkpoints pruned since
        stale = [u for u in self.dir.glob("step_*.universal") if not (self.dir / u.stem).exists()]
        for tmp in [*self.dir.glob(".tmp-*"), *self.dir.glob(".step_*.tmp"), *stale]:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def resume(self, mode, run_dir: Path) -> Optional[dict]:
        """Apply `resume` (auto | never | must | a path); returns the client state or None (fresh)."""
        mode = str(mode)
        if mode == "never":
            return None
        where = run_dir if mode in ("auto", "must") else Path(mode)
        path = find_checkpoint(where)
        if path is None:
            if mode == "auto":
                return None
            raise CheckpointError(f"no checkpoint found in {where}; train without resume=... to start fresh, "
                                  f"or point resume= at a run dir that has checkpoints/step_*")
        if self.backend.name == "ddp" and path.is_dir() or self.backend.name != "ddp" and path.is_file():
            raise CheckpointError(f"{path} was written by the other backend; resume with the train.backend it was saved with")
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
