"""Momentum (EMA) copies of networks: MoCo's key encoder, and later EMA generators / denoisers.

    target <- m * target + (1 - m) * online        once per optimizer step

Under DeepSpeed ZeRO-3 every parameter is partitioned: each rank holds a flat slice `p.ds_tensor`
of it, and two parameters of the same shape are sliced identically. So the momentum copy is kept
*partitioned in step with* the online network and updated slice by slice on each rank, with no
communication and no gathered copy of the whole model (its forward gathers its weights like any
ZeRO-3 module). Small parameters that ZeRO-3 keeps whole on every rank ("persistent") have their
full copy updated as well. With DDP and ZeRO-1/2 parameters are replicated and the full tensors are updated.

When the weights are bf16/fp16 (DeepSpeed's half-precision modules), an fp32 master of the target
is kept: at m = 0.99..0.9999 the per-step change is below bf16's resolution and a half-precision
EMA would stall. The master is not checkpointed; on resume it restarts from the saved (half
precision) target, a rounding-sized difference.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn as nn


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

    def _setup(self):
        # Lazily, at the first update: after DeepSpeed has cast, partitioned or re-wrapped the weights.
        t, o = list(self.target.parameters()), list(self.online.parameters())
        shape = lambda p: tuple(getattr(p, "ds_shape", p.shape))   # noqa: E731  (ZeRO-3 keeps the full shape here)
        if len(t) != len(o) or any(shape(a) != shape(b) for a, b in zip(t, o)):
            raise ValueError("EMA target and online networks have different parameters")
        self._pairs = list(zip(t, o))
        self._masters = {}   # (pair index, "part"|"full") -> fp32 master, for half-precision targets

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self._pairs is None:
            self._setup()
        for i, (t, o) in enumerate(self._pairs):
            for kind, tv, ov in _views(t, o):
                if tv.dtype == torch.float32:
                    tv.mul_(momentum).add_(ov, alpha=1 - momentum)
                    continue
                master = self._masters.get((i, kind))
                if master is None:
                    master = self._masters[(i, kind)] = tv.float()
                master.mul_(momentum).add_(ov.float(), alpha=1 - momentum)
                tv.copy_(master)
        if self.copy_buffers:
            for tb, ob in zip(self.target.buffers(), self.online.buffers()):
                tb.copy_(ob)

    def reset(self) -> None:
        """Forget the fp32 masters (after loading weights into the target, e.g. on resume)."""
        self._pairs = None
