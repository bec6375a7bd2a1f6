"""Shared by the momentum-encoder methods (MoCo v2, MoCo v3, BYOL): a frozen EMA copy of the online
networks, its momentum (a scheduled hyper-parameter), and exporting either backbone."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from pretrain.methods.base import Method
from pretrain.models.ema import EMA, momentum_copy
from pretrain.params import fraction
from pretrain.schedules import StepContext


class MomentumMethod(Method):
    """A Method whose `key_<name>` modules are EMA copies of its `<name>` modules.

    momentum: m in target <- m * target + (1 - m) * online, applied once per optimizer step
    (`after_step`), never per micro-batch, with m the value at that step: a number, or a schedule such as
    BYOL's / MoCo v3's `{shape: cosine, start: 0.996, end: 1.0}` (pretrain/schedules.py).
    """

    #: the rules of the keys every momentum method has; subclasses add theirs: {**MomentumMethod.checks, ...}
    checks = {"momentum": fraction()}
    scheduled = ("momentum",)

    def init_momentum_encoder(self, names: Sequence[str]) -> None:
        """Create `key_<name>` for each online module `<name>` (call after building them)."""
        for n in names:
            setattr(self, f"key_{n}", momentum_copy(getattr(self, n)))
        # Unregistered containers: the EMA only needs to walk both sides in the same order.
        self.ema = EMA(nn.ModuleList([getattr(self, f"key_{n}") for n in names]),
                       nn.ModuleList([getattr(self, n) for n in names]))

    def after_step(self, ctx: StepContext) -> None:
        self.ema.update(ctx["momentum"])

    def export_backbone(self, which: str = "default"):
        if which in ("default", "query"):
            return self.backbone
        if which == "key":
            return self.key_backbone
        raise ValueError(f"{type(self).__name__} exports --which query (default) or key, not {which!r}")
