"""Schedules as pure functions of the step, so resuming needs nothing but the step."""
from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `total` (momentum, temperature...)."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, base: float, warmup: int, final: float = 0.0) -> float:
    """Linear warmup from ~0 to `base` over `warmup` steps, then cosine decay to `final`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), base, final)


def scaled_lr(base: float, global_batch: int, rule: str) -> float:
    """The usual batch-size scaling of a base LR quoted at batch 256."""
    if rule == "linear":
        return base * global_batch / 256
    if rule == "sqrt":
        return base * math.sqrt(global_batch / 256)
    if rule == "none":
        return base
    raise ValueError(f"optim.lr_scaling must be linear, sqrt or none, got {rule!r}")
