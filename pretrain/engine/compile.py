"""train.compile: torch.compile of the method's forward (its backward through AOTAutograd).

`train.compile` is false (eager), true (inductor) or the name of any torch.compile backend
(`torch._dynamo.list_backends(exclude_tags=())`, e.g. `aot_eager`, which traces and runs the same kernels
as eager: the tests use it). `compile_method(model, cfg)` returns what the backend calls in place of the
model: the model itself when off, else a `CompiledMethod`.

Fallback, never strict: a graph that the backend fails to compile is logged as one warning line naming the
method and the error, and that part of the forward runs eagerly (dynamo's `suppress_errors`, per frame, so
nothing runs twice); the run goes on, only slower. There is no strict mode: to debug a compile failure, run
the model under torch.compile yourself with TORCH_LOGS=graph_breaks,recompiles.

Recompilation: the step context's scheduled values (lr, momentum, DINO's teacher temperature...) change
every step, and dynamo specialises the Python floats it reads (a guard `ctx.values['teacher_temp'] == 0.04`),
so the forward would compile again at the next step. The compiled forward therefore gets a copy of the
context whose float values are 0-d float64 CPU tensors: ctx[name] still works everywhere (arithmetic, math,
float()), a tensor input is guarded on its dtype and shape only, and nothing recompiles as they change.
Hooks outside the forward (before_step, on_gradients, after_step) keep the plain floats.
Integer attributes of the method's modules that change every step (MoCo v2's queue pointer) are likewise
made dynamic (dynamo's `allow_unspec_int_on_nn_module`): one recompilation when the value first changes, none
after (otherwise one per step until dynamo's recompile limit, then eager). A Python bool that switches the
graph (SwAV's prototype freeze ending) recompiles once, as it should.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from pretrain.schedules import StepContext

log = logging.getLogger(__name__)


def compile_backend(value) -> Optional[str]:
    """The torch.compile backend `train.compile` names: None for false, "inductor" for true, else the name
    itself if torch knows it (a one-line ConfigError otherwise)."""
    if value is None or value is False:
        return None
    if value is True:
        return "inductor"
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if isinstance(value, str) and value in known:
        return value
    from pretrain.config import ConfigError

    raise ConfigError(f"train.compile={value!r} is not a torch.compile backend; use false, true (inductor) or one "
                      f"of {', '.join(b for b in known if 'TESTING' not in b)}")


def tensor_context(ctx: Optional[StepContext]) -> Optional[StepContext]:
    """A copy of `ctx` whose float values are 0-d float64 CPU tensors (see the module docstring)."""
    if ctx is None:
        return None
    values = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v for k, v in ctx.values.items()}
    return StepContext(ctx.step, ctx.total, ctx.steps_per_epoch, ctx.phase, values)


class CompiledMethod:
    """Calls `torch.compile(model)` with a tensor step context (`tensor_context`) and dynamo's per-frame
    fallback to eager; any other attribute is the model's (DDP's `no_sync`). `graphs`: graphs compiled so far
    (recompilations included), `errors`: the backend errors that sent a graph back to eager."""

    def __init__(self, model, backend: str, name: str):
        import torch._dynamo

        self.model, self.name, self.backend = model, name, backend
        self._compile = torch._dynamo.lookup_backend(backend)
        self.graphs, self.errors = 0, []
        self.compiled = torch.compile(model, backend=self._counted)

    def _counted(self, gm, example_inputs):
        from torch._dynamo.exc import RestartAnalysis

        try:
            out = self._compile(gm, example_inputs)
        except RestartAnalysis:   # dynamo's control flow (it traces the frame again), not a failure
            raise
        except Exception as e:
            self.errors.append(e)
            if len(self.errors) > 1:   # one line per run; `errors` keeps them all
                raise
            log.warning("train.compile: %s could not compile a graph of method %s (%s: %s); that part runs eagerly",
                        self.backend, self.name, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            raise
        self.graphs += 1
        return out

    def __call__(self, batch, ctx: Optional[StepContext] = None):
        import torch._dynamo

        with torch._dynamo.config.patch(suppress_errors=True, allow_unspec_int_on_nn_module=True):
            return self.compiled(batch, tensor_context(ctx))

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


def compile_method(model, cfg):
    """`model` (the method, or its DDP wrapper) as train.compile asks: itself, or a CompiledMethod."""
    backend = compile_backend(cfg.train.compile)
    if backend is None:
        return model
    method = getattr(model, "module", model)   # DDP's wrapped method
    return CompiledMethod(model, backend, getattr(getattr(cfg, "method", None), "name", None) or type(method).__name__)
