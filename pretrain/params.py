"""Declared rules for config values: method hyper-parameters and view augmentation parameters.

Each method lists a rule per key of its `defaults` in `checks`:

    defaults = {"temperature": 0.2, "queue_size": 65536, "schedule": "cosine"}
    checks = {"temperature": positive(), "queue_size": integer(1), "schedule": choice("linear", "cosine")}

`create_method` validates the `method.*` keys against them before anything is built, so a bad value
is a one-line error naming the key (`method.bound_samples must be an integer >= 1, got 0`). Rules
that relate two keys (DDPM's sample_steps <= timesteps) stay in the method's constructor. Every
rule carries examples of values it refuses: the registry-wide test feeds them to every method.
pretrain.data.views checks `data.augment` / `data.views` with the same rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Tuple


@dataclass(frozen=True)
class Rule:
    """What a value must be (`describe`, for the error message), the test, and refused examples."""

    describe: str
    ok: Callable[[Any], bool]
    invalid: Tuple[Any, ...]

    def check(self, name: str, value: Any) -> None:
        """A one-line ConfigError naming the config key `name` (e.g. method.temperature) unless `value` passes."""
        from pretrain.config import ConfigError

        if not self.ok(value):
            raise ConfigError(f"{name} must be {self.describe}, got {value!r}")


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive() -> Rule:
    """A finite number > 0."""
    return Rule("a number > 0", lambda v: _number(v) and v > 0, (0, -0.5, float("nan"), "x"))


def optional(rule: Rule) -> Rule:
    """`rule`, or null (which the method reads as "derive it", e.g. from the backbone's width)."""
    return Rule(f"null or {rule.describe}", lambda v: v is None or rule.ok(v), rule.invalid)


def non_negative() -> Rule:
    """A finite number >= 0."""
    return Rule("a number >= 0", lambda v: _number(v) and v >= 0, (-0.1, float("inf"), "x"))


def fraction(lo: float = 0.0, hi: float = 1.0, lo_open: bool = False, hi_open: bool = False,
             what: str = "a number") -> Rule:
    """A number in [lo, hi] (open at either end when asked); `what` names it in the message (a probability)."""
    def ok(v):
        return _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Rule(f"{what} in {span}", ok, tuple(x for x in (lo - 0.5, hi + 0.5, "x") + ((lo,) if lo_open else ())
                                                + ((hi,) if hi_open else ())))


def integer(lo: int = 1, hi: int = None) -> Rule:
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    def ok(v):
        return _int(v) and v >= lo and (hi is None or v <= hi)
    bad = (lo - 1, 1.5, "x") + ((hi + 1,) if hi is not None else ())
    return Rule(f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""), ok, bad)


def integers(lo: int = 1) -> Rule:
    """A non-empty list of integers >= lo."""
    def ok(v):
        return isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(x) and x >= lo for x in v)
    return Rule(f"a non-empty list of integers >= {lo}", ok, ([], [lo - 1], 3))


def pair(lo: float = 0.0, hi: float = None, unit: str = "") -> Rule:
    """A pair [a, b] with lo < a <= b (and b <= hi when given): a range to draw from."""
    def ok(v):
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v) and lo < v[0] <= v[1]
                and (hi is None or v[1] <= hi))
    return Rule(f"a pair [a, b] with {lo:g} < a <= b" + (f" <= {hi:g}" if hi is not None else "") + unit, ok,
                ([lo, 1], [2, 1], 0.5) + (([hi / 2, hi + 1],) if hi is not None else ()))


def choice(*names: str) -> Rule:
    """One of `names`."""
    return Rule(f"one of {', '.join(names)}", lambda v: v in names, ("bogus", 1))


def boolean() -> Rule:
    """true or false."""
    return Rule("true or false", lambda v: isinstance(v, bool), ("yes", 2))


def validate(cls, kwargs: Dict[str, Any]) -> None:
    """Check `method.*` keys of `cls` against its declared `checks` (keys without a rule pass). A key the
    method lists in `scheduled` may be a schedule mapping (pretrain/schedules.py): its `start` and `end`
    must each pass the key's rule; a mapping for any other key is an error saying which keys can."""
    from pretrain.config import ConfigError
    from pretrain.schedules import Schedule

    checks = getattr(cls, "checks", {})
    scheduled = getattr(cls, "scheduled", ())
    for key, value in kwargs.items():
        if isinstance(value, Mapping) or isinstance(value, Schedule):
            if key not in scheduled:
                can = f"these can: {', '.join(scheduled)}" if scheduled else "none of its keys can"
                raise ConfigError(f"method.{key} cannot follow a schedule ({cls.__name__} reads it once, when it "
                                  f"is built); give a single value ({can})")
            try:
                sched = Schedule.parse(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"method.{key}: {e}") from None
            if key in checks:
                for end in ("start", "end"):
                    checks[key].check(f"method.{key}.{end}", getattr(sched, end))
        elif key in checks:
            checks[key].check(f"method.{key}", value)
