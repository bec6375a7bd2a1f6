"""Shared by the momentum-encoder methods (MoCo v2, MoCo v3, BYOL): a frozen EMA copy of the online
networks, its momentum schedule, and exporting either backbone."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from pretrain.methods.base import Method
from pretrain.models.ema import EMA, momentum_copy
from pretrain.params import choice, fraction
from pretrain.schedules import cosine

SCHEDULES = ("constant", "cosine")


class MomentumMethod(Method):
    """A Method whose `key_<name>` modules are EMA copies of its `<name>` modules.

    momentum: m in target <- m * target + (1 - m) * online, applied once per optimizer step
    (`after_step`), never per micro-batch. momentum_schedule: "constant", or "cosine" from m at
    step 0 to 1.0 at the last step (BYOL / MoCo v3) -- a function of the step, so resume needs nothing else.
    """

    #: the rules of the keys every momentum method has; subclasses add theirs: {**MomentumMethod.checks, ...}
    checks = {"momentum": fraction(), "momentum_schedule": choice(*SCHEDULES)}

    def __init__(self, backbone: nn.Module, momentum: float, momentum_schedule: str):
        super().__init__(backbone)
        self.momentum, self.momentum_schedule = momentum, momentum_schedule

    def init_momentum_encoder(self, names: Sequence[str]) -> None:
        """Create `key_<name>` for each online module `<name>` (call after building them)."""
        for n in names:
            setattr(self, f"key_{n}", momentum_copy(getattr(self, n)))
        # Unregistered containers: the EMA only needs to walk both sides in the same order.
        self.ema = EMA(nn.ModuleList([getattr(self, f"key_{n}") for n in names]),
                       nn.ModuleList([getattr(self, n) for n in names]))

    def momentum_at(self, step: int, total: int) -> float:
        if self.momentum_schedule == "cosine":
            return cosine(step, total, self.momentum, 1.0)
        return self.momentum

    def after_step(self, step: int, total_steps: int) -> None:
        self.ema.update(self.momentum_at(step, total_steps))

    def export_backbone(self, which: str = "default"):
        if which in ("default", "query"):
            return self.backbone
        if which == "key":
            return self.key_backbone
        raise ValueError(f"{type(self).__name__} exports --which query (default) or key, not {which!r}")
