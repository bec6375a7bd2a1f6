"""Schedules as pure functions of the step, so resuming needs nothing but the step.

Any hyper-parameter a method lists in `Method.scheduled` (and the engine's `optim.weight_decay`) takes either a
number (constant) or a mapping, e.g. DINO's

    teacher_temp: {shape: linear, start: 0.04, end: 0.07, epochs: 30}      # warm up, then hold 0.07
    momentum:     {shape: cosine, start: 0.996, end: 1.0}                   # over the whole run
    freeze_last_layer: {shape: step, start: 1, end: 0, epochs: 1}          # 1 during epoch 0, then 0

`Schedule` is that mapping; every step the trainer evaluates each schedule into a `StepContext`, which
`training_step(batch, ctx)` and the other hooks read (`ctx["teacher_temp"]`), and logs it to TensorBoard
under `schedule/`. The LR keeps its own keys (optim.lr, warmup_*, min_lr) and is the same object.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

SHAPES = ("constant", "linear", "cosine", "step")


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `total` (momentum, temperature...)."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, base: float, warmup: int, final: float = 0.0) -> float:
    """Linear warmup from ~0 to `base` over `warmup` steps, then cosine decay to `final`."""
    return Schedule(base, final, "cosine", warmup_steps=warmup)(step, total, 1)


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the step: an optional linear warmup from `warmup_from` to `start` over
    warmup_steps (or warmup_epochs), then `shape` from `start` to `end` over the next `steps` (or `epochs`;
    default: to the end of the run), then `end`.

    shape: constant (always `start` after warmup), linear, cosine (half-cosine), step (`start` until the
    ramp's end, then `end`). Warmup step s < W gives warmup_from + (start - warmup_from) * (s + 1) / W (the
    LR's warmup, which this object also runs). A ramp of R steps reaches `end` at step W + R."""

    start: float
    end: Optional[float] = None
    shape: str = "constant"
    epochs: Optional[float] = None
    steps: Optional[int] = None
    warmup_epochs: Optional[float] = None
    warmup_steps: Optional[int] = None
    warmup_from: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.end is None:
            object.__setattr__(self, "end", self.start)
        for a, b in (("epochs", "steps"), ("warmup_epochs", "warmup_steps")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        for k in ("start", "end", "warmup_from", "epochs", "steps", "warmup_epochs", "warmup_steps"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or (k not in ("start", "end", "warmup_from") and v < 0)):
                raise ValueError(f"{k} must be a finite number{'' if k in ('start', 'end', 'warmup_from') else ' >= 0'}, "
                                 f"got {v!r}")

    @classmethod
    def parse(cls, value: Any) -> "Schedule":
        """A config value -> Schedule: a number is a constant, a mapping names the fields above."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown schedule key(s) {', '.join(sorted(unknown))}; a schedule has "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            if "start" not in value:
                raise ValueError("a schedule needs `start`")
            return cls(**value)
        return cls(value)

    def _span(self, epochs, steps, steps_per_epoch: int) -> Optional[int]:
        return steps if steps is not None else None if epochs is None else round(epochs * steps_per_epoch)

    def __call__(self, step: int, total: int, steps_per_epoch: int = 1) -> float:
        warm = self._span(self.warmup_epochs, self.warmup_steps, steps_per_epoch) or 0
        if step < warm:
            return self.warmup_from + (self.start - self.warmup_from) * (step + 1) / warm
        ramp = self._span(self.epochs, self.steps, steps_per_epoch)
        ramp = max(total - warm, 1) if ramp is None else max(ramp - warm, 0)
        u = step - warm
        if self.shape == "constant":
            return self.start
        if self.shape == "step" or ramp == 0:
            return self.start if u < ramp else self.end
        if self.shape == "linear":
            return self.start + (self.end - self.start) * min(u / ramp, 1.0)
        return cosine(u, ramp, self.start, self.end)

    def to_config(self):
        """The plain value a config shows for it: the number for a constant, else the mapping."""
        if self.shape == "constant" and self.warmup_epochs is None and self.warmup_steps is None:
            return self.start
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "warmup_from" and v == 0.0)}


class StepContext:
    """What every hook sees about the current optimizer step: `step` (0-based), `total`, `steps_per_epoch`,
    `epoch`, the optimizer `phase`, and ctx[name] -> the value of hyper-parameter `name` at this step (each
    of the method's `scheduled` keys, plus the engine's "lr" and "weight_decay" during training).

    A plain class, not a dataclass or tuple: DDP's input-moving code rebuilds those."""

    __slots__ = ("step", "total", "steps_per_epoch", "phase", "values")

    def __init__(self, step: int, total: int, steps_per_epoch: int = 1, phase: str = "main",
                 values: Optional[Dict[str, float]] = None):
        self.step, self.total, self.steps_per_epoch = step, total, max(steps_per_epoch, 1)
        self.phase, self.values = phase, dict(values or {})

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __getitem__(self, name: str) -> float:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"{name!r} has no value in this step's context (known: {', '.join(self.values)}); "
                           f"list it in the method's `scheduled`") from None

    def with_phase(self, phase: str) -> "StepContext":
        return StepContext(self.step, self.total, self.steps_per_epoch, phase, self.values)

    def __repr__(self):
        return f"StepContext(step={self.step}/{self.total}, phase={self.phase!r}, {self.values})"


def scaled_lr(base: float, global_batch: int, rule: str) -> float:
    """The usual batch-size scaling of a base LR quoted at batch 256."""
    if rule == "linear":
        return base * global_batch / 256
    if rule == "sqrt":
        return base * math.sqrt(global_batch / 256)
    if rule == "none":
        return base
    raise ValueError(f"optim.lr_scaling must be linear, sqrt or none, got {rule!r}")
