"""Momentum (EMA) copies of networks: MoCo's key encoder, and later EMA generators / denoisers.

    target <- m * target + (1 - m) * online        once per optimizer step

Under DeepSpeed ZeRO-3 every parameter is partitioned: each rank holds a flat slice `p.ds_tensor`
of it, and two parameters of the same shape are sliced identically. So the momentum copy is kept
*partitioned in step with* the online network and updated slice by slice on each rank, with no
communication and no gathered copy of the whole model (its forward gathers its weights like any
ZeRO-3 module). Small parameters that ZeRO-3 keeps whole on every rank ("persistent") have their
full copy updated as well. With DDP and ZeRO-1/2 parameters are replicated and the full tensors are updated. Under FSDP2 both
networks' parameters are DTensors sharded alike (the backend shards the target with the rule it shards
the online network with): each rank updates its local shards, again with no communication.

The update is one `torch._foreach_lerp_` over the flat lists of tensors (a few fused kernels instead of
two per tensor; `foreach=False` keeps the per-tensor loop, measured against it in docs/benchmarks.md).

When the weights are bf16/fp16 (DeepSpeed's half-precision modules), an fp32 master of the target
is kept: at m = 0.99..0.9999 the per-step change is below bf16's resolution and a half-precision
EMA would stall. The masters are checkpointed (`state_dict`, in the method's extra state), so a
resumed run continues bit for bit. They are per rank under ZeRO-3 (each rank's partition), and
a checkpoint's client state is written by rank 0: the partition masters are gathered to rank 0 on
save and scattered back on load. Resumed on another number of ranks, the partitions no longer
match: those masters restart from the (half-precision) target, with a warning.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from pretrain.comm import world_info

log = logging.getLogger("pretrain")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of `module` (requires_grad=False) to serve as its EMA target."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def _available(p: torch.Tensor) -> bool:
    return getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"


def _views(t: torch.Tensor, o: torch.Tensor):
    """The (target, online) tensors to update for one parameter pair: the full tensors normally; under
    ZeRO-3 this rank's partitions, plus the full tensors while they are materialised on every rank
    (ZeRO-3 keeps small "persistent" parameters whole after their first forward and would not
    re-gather a frozen one, so its full copy must be updated too, identically)."""
    if isinstance(t, DTensor) or isinstance(o, DTensor):
        if not (isinstance(t, DTensor) and isinstance(o, DTensor) and t.placements == o.placements):
            raise ValueError("EMA: the target and online networks are not sharded alike by FSDP; shard both with "
                             "the same rule (the fsdp backend shards every module of the method)")
        return [("part", t.to_local(), o.to_local())]
    if hasattr(t, "ds_tensor") != hasattr(o, "ds_tensor"):
        raise ValueError("EMA: one network is partitioned by ZeRO-3 and the other is not; put both under the "
                         "same DeepSpeed engine (or use ZeRO-1/2)")
    if not hasattr(t, "ds_tensor"):
        return [("full", t.data, o.data)]
    views = [("part", t.ds_tensor, o.ds_tensor)]
    if _available(t) and _available(o):
        views.append(("full", t.data, o.data))
    return views


class EMA:
    """Updates `target`'s parameters towards `online`'s. Both must have the same architecture.
    Buffers (e.g. BN running statistics) are left alone: the target's own forwards update them,
    as in MoCo; pass copy_buffers=True to copy them from the online network instead."""

    def __init__(self, target: nn.Module, online: nn.Module, copy_buffers: bool = False):
        self.target, self.online, self.copy_buffers = target, online, copy_buffers
        self._pairs: Optional[list] = None
        self._masters: dict = {}   # (pair index, "part"|"full") -> fp32 master, for half-precision targets

    def _setup(self):
        # Lazily, at the first update or load: after DeepSpeed has cast, partitioned or re-wrapped the weights.
        t, o = list(self.target.parameters()), list(self.online.parameters())
        if len(t) != len(o) or any(_full_shape(a) != _full_shape(b) for a, b in zip(t, o)):
            raise ValueError("EMA target and online networks have different parameters")
        self._pairs = list(zip(t, o))

    @torch.no_grad()
    def update(self, momentum: float, foreach: bool = True) -> None:
        """target <- momentum * target + (1 - momentum) * online, on every (local part of a) parameter."""
        if self._pairs is None:
            self._setup()
        full, halves = ([], []), ([], [], [])   # (targets, onlines); (targets, fp32 masters, onlines)
        for i, (t, o) in enumerate(self._pairs):
            for kind, tv, ov in _views(t, o):
                if tv.dtype == torch.float32:
                    full[0].append(tv), full[1].append(ov)
                    continue
                master = self._masters.get((i, kind))
                if master is None:
                    master = self._masters[(i, kind)] = tv.float()
                halves[0].append(tv), halves[1].append(master), halves[2].append(ov.float())
        _lerp_(full[0], full[1], momentum, foreach)
        _lerp_(halves[1], halves[2], momentum, foreach)
        for tv, master in zip(halves[0], halves[1]):
            tv.copy_(master)
        if self.copy_buffers:
            for tb, ob in zip(self.target.buffers(), self.online.buffers()):
                tb.copy_(ob)

    def reset(self) -> None:
        """Forget the fp32 masters: they restart from the target's weights (after loading weights into it)."""
        self._pairs, self._masters = None, {}

    def _partitioned(self) -> bool:
        return any(hasattr(p, "ds_tensor") for p in self.target.parameters())

    def state_dict(self) -> dict:
        """What the EMA keeps beyond the target's weights, for a checkpoint: the fp32 masters, as CPU
        tensors under "<pair index>.<full|part>" (none where the target is fp32). "full" masters are
        the same on every rank; "part" masters (ZeRO-3) are this rank's partitions, gathered to rank 0
        as "parts" (a list by rank), so call this on every rank together. Other ranks return no parts."""
        rank, world = world_info()
        kept = {kind: {f"{i}.{k}": m.detach().cpu().clone() for (i, k), m in self._masters.items() if k == kind}
                for kind in ("full", "part")}
        parts = [kept["part"]]
        if world > 1 and self._partitioned():
            parts = [None] * world if rank == 0 else None
            dist.gather_object(kept["part"], parts, dst=0)
        return {"world": world, "full": kept["full"], "parts": parts if rank == 0 else []}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore `state_dict()`'s masters after the target's weights were loaded; call on every rank
        together (ZeRO-3: rank 0 hands each rank its partitions). None (a checkpoint without EMA state)
        restarts the masters from the target. Partition masters saved by another number of ranks
        cannot be used: they restart from the target, with a warning."""
        rank, world = world_info()
        self.reset()
        self._setup()
        state = state or {"world": world, "full": {}, "parts": []}
        parts = state["parts"]
        if rank == 0 and any(parts) and state["world"] != world:
            log.warning("the EMA's fp32 masters of ZeRO-3 partitions were saved by %d rank(s) and this run has %d: "
                        "they restart from the half-precision EMA weights (a rounding-sized difference from an "
                        "uninterrupted run)", state["world"], world)
            parts = []
        if world > 1 and self._partitioned():
            mine = [None]
            dist.scatter_object_list(mine, (list(parts) or [{}] * world) if rank == 0 else None, src=0)
            part = mine[0] or {}
        else:
            part = parts[0] if parts else {}
        for key, master in {**state["full"], **part}.items():
            i, kind = key.split(".")
            t = self._pairs[int(i)][0]
            view = t.ds_tensor if kind == "part" and hasattr(t, "ds_tensor") else t if kind == "full" else None
            shape = None if view is None else tuple(view.shape) if kind == "part" else _full_shape(t)
            if shape != tuple(master.shape):
                raise ValueError(f"the checkpoint's EMA master {key} is {tuple(master.shape)} and the model has "
                                 f"{shape or 'no ZeRO-3 partition'} there: resume with the run's own model and ZeRO stage")
            self._masters[(int(i), kind)] = master.to(view.device, torch.float32, copy=True)


def _lerp_(targets: list, onlines: list, momentum: float, foreach: bool) -> None:
    """targets[i] <- momentum * targets[i] + (1 - momentum) * onlines[i]: one fused lerp over the lists, or
    tensor by tensor (two kernels each)."""
    if not targets:
        return
    if foreach:
        torch._foreach_lerp_(targets, onlines, 1 - momentum)
        return
    for t, o in zip(targets, onlines):
        t.mul_(momentum).add_(o, alpha=1 - momentum)


def _full_shape(p: torch.Tensor):
    return tuple(getattr(p, "ds_shape", p.shape))   # ZeRO-3 keeps the full shape here
