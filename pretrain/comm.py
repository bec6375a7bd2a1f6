"""Who this process is among the ranks, and the few host-side collectives everything shares.

The one place that asks torch.distributed for rank and world size, for the library (losses, norms,
methods) and the app (trainer, checkpoints, backends) alike. `pretrain.dist` joins the process group
from what a launcher set up; this module only asks. Outside a process group every function
answers for a world of one (rank 0), so the same code runs in one process without branches.
A new backend (FSDP, a device mesh) changes what these return here, nowhere else.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def initialized() -> bool:
    """True inside a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def world_info() -> Tuple[int, int]:
    """(rank, world size)."""
    return rank(), world_size()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over ranks (a new tensor; x itself in a world of one)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`src`'s picklable obj, on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable obj, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
