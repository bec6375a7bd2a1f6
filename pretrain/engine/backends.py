"""Training backends: the one place that knows whether DDP, DeepSpeed or FSDP2 runs the model.

`Backend` is the protocol. The loop only calls `phase(name)`, `accumulate(last)`, `forward(batch, ctx)`,
`backward(loss)`, `step(ctx, need_norm)` and `set_lr(lr, peak, weight_decay, values)`; checkpointing
only `checkpoint_name(step)`, `save(path, client_state)` and `load(path)`; export only the class
methods `wrote(path)` and `consolidate(path)`. No caller ever names a backend. `module` is the bare
method for hooks and eval. `step` runs the method's `on_gradients(ctx, grads)` hook between the last
backward and the optimizer step, with a `Gradients` view that reads and writes full gradients under
any backend.

Methods with several optimizer phases per step (a GAN's D and G steps, `Method.phases`) get one
optimizer per phase, and inside `phase(name)` only that phase's parameters require gradients, so a
backward never touches the other network's gradients (nor, under DeepSpeed, its engine's hooks).
Gradients are averaged over ranks by DDP for one-phase methods; for several phases, where a
DDP wrapper would expect every parameter in every backward, by one flat all-reduce per phase step.
The DeepSpeed backend lives in pretrain/engine/deepspeed_backend.py, FSDP2 in pretrain/engine/fsdp.py.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from pretrain import comm
from pretrain.engine.compile import compile_method
from pretrain.engine.optim import build_optimizer
from pretrain.utils import atomic_path

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _precision(cfg):
    if cfg.train.precision not in DTYPES:
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}")
    return DTYPES[cfg.train.precision]


def group_lr(group: dict, lr: float, peak: float, values: Optional[dict] = None) -> float:
    """A parameter group's LR when the schedule says `lr` (peak: `peak`): its `fixed_lr` keeps the peak,
    its `lr_scale` scales either (Method.param_groups); 0 while the step's scheduled value named by its
    `frozen_by` (`values`: the step context's) is > 0 (DINO's last layer in its first epoch)."""
    if group.get("frozen_by") and (values or {}).get(group["frozen_by"], 0) > 0:
        return 0.0
    return (peak if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)


def set_group_lrs(optimizers, lr: float, peak: float, weight_decay: Optional[float] = None,
                  values: Optional[dict] = None) -> None:
    """Every group's LR (group_lr) and, when given, its weight decay: optim.weight_decay's value at this step
    times the group's `wd_mult` (what Method.param_groups gave it for a weight decay of 1)."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = group_lr(g, lr, peak, values)
            if weight_decay is not None:
                g["weight_decay"] = g.get("wd_mult", 1.0) * weight_decay


def build_optimizers(method, cfg) -> dict:
    """One optimizer per phase over `method.param_groups`, each group's weight decay recorded relative to
    optim.weight_decay (`wd_mult`) so that a weight-decay schedule can set it every step."""
    from pretrain.schedules import Schedule

    wd0 = Schedule.parse(cfg.optim.weight_decay).start
    out = {}
    for p in method.phases:
        groups = [{**g, "wd_mult": g.get("weight_decay", 1.0)} for g in method.param_groups(1.0, p)]
        out[p] = build_optimizer([{**g, "weight_decay": g["wd_mult"] * wd0} for g in groups], cfg.optim)
    return out


class Gradients:
    """Full (unpartitioned, unscaled) gradients between the backward and the optimizer step, for
    `Method.on_gradients`: plain `.grad` under DDP (GradScaler's unscale_ has run); under FSDP2 the
    DTensor shards gathered (`full_tensor`, a collective: every rank makes the same calls) and written back
    to this rank's shard; under DeepSpeed its `safe_get_full_grad` / `safe_set_full_grad`, which reach
    ZeRO's partitioned fp32 gradient buffers (a collective under ZeRO-3), still multiplied by fp16's loss
    scale `scale` until ZeRO's step: divided out here (DeepSpeed fp16 is not testable on CPU)."""

    def __init__(self, deepspeed: bool = False, scale: float = 1.0):
        self.deepspeed, self.scale = deepspeed, scale

    def get(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
            return g if g is None or self.scale == 1.0 else g / self.scale
        return p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad

    def set(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_grad

            safe_set_full_grad(p, value if self.scale == 1.0 else value * self.scale)
        elif isinstance(p, DTensor):   # `value` is the same on every rank: each keeps its own shard of it
            shard = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            if p.grad is None:
                p.grad = shard
            else:
                p.grad.copy_(shard)
        elif p.grad is None:
            p.grad = value.to(p.dtype).clone()
        else:
            p.grad.copy_(value)

    def zero_(self, params) -> None:
        """Zero the gradients of `params` that have one (every rank together under ZeRO-3 and FSDP2)."""
        for p in params:
            g = self.get(p)
            if g is not None:
                self.set(p, torch.zeros_like(g))


def _cast(x, dtype):
    """Floating tensors (also inside lists: batch["views"]) to `dtype`; anything else unchanged."""
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x


def place(method, cfg, device):
    """`method` on `device`; with train.channels_last its 4-d weights stored NHWC, so convolutions
    pick NHWC kernels and hand NHWC activations on (cuDNN's fast path under bf16/fp16; measured on
    CPU in docs/benchmarks.md). Other tensors keep their layout."""
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    return method.to(device)


@contextlib.contextmanager
def only_training(method, phase: str):
    """Inside: only `phase`'s parameters (those that were trainable) require gradients."""
    if len(method.phases) == 1:
        yield
        return
    mine = {id(p) for p in method.phase_module(phase).parameters()}
    trainable = [p for p in method.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(id(p) in mine)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def broadcast_buffers(module) -> None:
    """Every rank on rank 0's buffers (BN statistics), as DDP's `broadcast_buffers` does before each forward:
    for the backends and phases that have no DDP wrapper to do it."""
    if comm.world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def all_reduce_grads(params) -> None:
    """Average .grad over ranks with one flat all-reduce (what DDP does, without the wrapper)."""
    if comm.world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]   # same layout on every rank
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= comm.world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


class Backend:
    """What the trainer, the checkpointer and export may ask of a backend (DDP, DeepSpeed, FSDP2).

    Built as `Backend(method, cfg, device)`; `module` is then the method (on the device, possibly with
    replaced parameters: FSDP2's DTensors), `device`, and `dtype` (None for fp32) its compute precision."""

    name = "?"
    _phase = "main"

    # ---- the loop --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """`with backend.phase(name):` -- the optimizer phase the next backward/step belong to."""
        self._phase = name
        with only_training(self.module, name):
            yield

    def accumulate(self, last: bool):
        """Context for one micro-batch's forward+backward; `last`: the step's last (gradients synchronised)."""
        return contextlib.nullcontext()

    def forward(self, batch, ctx=None) -> dict:
        raise NotImplementedError

    def backward(self, loss) -> None:
        raise NotImplementedError

    def step(self, ctx=None, need_norm: bool = True) -> Optional[torch.Tensor]:
        """on_gradients, clipping and the optimizer step of `ctx.phase`; returns the global grad norm (a plain
        tensor) or None when neither clipping nor the caller needed it."""
        raise NotImplementedError

    def optimizers_(self) -> list:
        """The torch optimizers whose param groups carry the LR and weight decay values."""
        raise NotImplementedError

    def set_lr(self, lr: float, peak: Optional[float] = None, weight_decay: Optional[float] = None,
               values: Optional[dict] = None):
        """Every param group's LR and weight decay for this step (group_lr, set_group_lrs)."""
        set_group_lrs(self.optimizers_(), lr, lr if peak is None else peak, weight_decay, values)

    def param_groups(self) -> list:
        """Every optimizer param group (their current LR/weight-decay values), phases in order."""
        return [g for opt in self.optimizers_() for g in opt.param_groups]

    def eval_module(self):
        """The method to run evaluation forwards on, outside the training wrapper."""
        return self.module

    def _plain_copy(self):
        """A fresh plain (unwrapped, unsharded, fp32) method of this run's config on the device, for an eval copy
        to load full weights into; building it does not move the training RNG."""
        from pretrain.methods import create_method

        with torch.random.fork_rng(devices=[]):
            return create_method(self.cfg, warm_start=False).to(self.device)

    # ---- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def checkpoint_name(cls, step: int) -> str:
        """The name of step `step`'s checkpoint in checkpoints/ (a file or a directory)."""
        return f"step_{step:08d}"

    def save(self, path: Path, client_state: dict) -> None:
        """Write the model, optimizer and `client_state` (plain Python/tensors: step, config, RNG...) to `path`,
        atomically (a temporary name renamed into place); every rank calls it."""
        raise NotImplementedError

    def load(self, path: Path) -> dict:
        """Restore what `save` wrote (possibly by another world size, where the format allows); returns the
        client state."""
        raise NotImplementedError

    @classmethod
    def wrote(cls, path: Path) -> bool:
        """Whether checkpoint `path` is in this backend's format."""
        meta = Path(path) / CONFIG_JSON
        return meta.is_file() and json.loads(meta.read_text())["train"]["backend"] == cls.name

    @classmethod
    def consolidate(cls, path: Path):
        """(the method's state_dict as full fp32 CPU tensors, the config dict) from checkpoint `path`, in one
        process without a process group (`pretrain export`); the optimizer state is not read."""
        raise NotImplementedError


#: a directory checkpoint's config as plain JSON (written by rank 0), so that export never unpickles it
CONFIG_JSON = "pretrain_config.json"


def single_process_group(device) -> None:
    """DeepSpeed and FSDP2 insist on a process group, even for one process: without launcher variables to
    rendezvous with, an in-memory store makes a group of one."""
    if comm.initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):   # DeepSpeed asserts on these
        os.environ.setdefault(k, v)


class DDPBackend(Backend):
    """torch DDP (or the bare module in one process) + autocast, GradScaler for fp16."""

    name = "ddp"

    def __init__(self, method, cfg, device):
        self.module = place(method, cfg, device)
        self.device, self.accum, self.clip = device, cfg.train.grad_accum, cfg.train.clip_grad
        world = comm.world_size()
        self.model = method
        self.ddp = world > 1 and len(method.phases) == 1
        if self.ddp:
            self.model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = compile_method(self.model, cfg)   # train.compile (pretrain/engine/compile.py)
        self.optimizers = build_optimizers(method, cfg)
        self.dtype = _precision(cfg)
        self.scalers = {p: torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16) for p in method.phases}
        self._phase = method.phases[0]

    def accumulate(self, last: bool):
        # Skip the gradient all-reduce on all but the last micro-batch of a step.
        if self.ddp and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward(self, batch, ctx=None):
        ctx = ctx or self.module.step_context(phase=self._phase)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(batch, ctx)

    def backward(self, loss):
        self.scalers[self._phase].scale(loss / self.accum).backward()

    def step(self, ctx=None, need_norm: bool = True) -> Optional[torch.Tensor]:
        """Average gradients (several phases), run the method's on_gradients hook, clip (when
        train.clip_grad > 0) and step the optimizer of `ctx.phase`. Returns the global grad norm, or None
        when nothing needed it: without clipping it is only computed for steps that log it."""
        ctx = ctx or self.module.step_context(phase=self._phase)
        phase = ctx.phase
        opt, scaler = self.optimizers[phase], self.scalers[phase]
        params = [p for g in opt.param_groups for p in g["params"]]
        if not self.ddp:
            all_reduce_grads(params)
        scaler.unscale_(opt)
        self.module.on_gradients(ctx, Gradients())
        norm = None
        if self.clip > 0 or need_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if not self.ddp and len(self.module.phases) > 1:
            broadcast_buffers(self.module)
        return norm

    def optimizers_(self) -> list:
        return list(self.optimizers.values())

    @classmethod
    def checkpoint_name(cls, step: int) -> str:
        return f"step_{step:08d}.pt"

    def save(self, path: Path, client_state: dict):
        """One file, written by rank 0 under a temporary name and renamed into place."""
        if not comm.is_main():
            return
        state = {"model": self.module.state_dict(),
                 "optimizer": {p: o.state_dict() for p, o in self.optimizers.items()},
                 "scaler": {p: s.state_dict() for p, s in self.scalers.items()}, **client_state}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load(self, path: Path) -> dict:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state.pop("model"))
        for p, sd in state.pop("optimizer").items():
            self.optimizers[p].load_state_dict(sd)
        for p, sd in state.pop("scaler").items():
            self.scalers[p].load_state_dict(sd)
        return state

    @classmethod
    def wrote(cls, path: Path) -> bool:
        return Path(path).is_file()

    @classmethod
    def consolidate(cls, path: Path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["model"], state["config"]



from pretrain.engine.deepspeed_backend import DeepSpeedBackend, deepspeed_config, to_universal  # noqa: E402
from pretrain.engine.fsdp import FSDPBackend  # noqa: E402

BACKENDS = {"ddp": DDPBackend, "deepspeed": DeepSpeedBackend, "fsdp": FSDPBackend}
__all__ = ["Backend", "BACKENDS", "create_backend", "checkpoint_writer", "deepspeed_config", "to_universal"]


def checkpoint_writer(path: Path):
    """The backend class whose format checkpoint `path` is in."""
    for cls in BACKENDS.values():
        if cls.wrote(path):
            return cls
    from pretrain.engine.checkpoint import CheckpointError

    raise CheckpointError(f"{path} is no checkpoint of {', '.join(BACKENDS)}; point at a run dir or checkpoints/step_*")


def create_backend(method, cfg, device) -> Backend:
    """The backend `train.backend` names, built over `method` on `device`."""
    if cfg.train.backend not in BACKENDS:
        raise ValueError(f"train.backend must be one of {', '.join(BACKENDS)}, got {cfg.train.backend!r}")
    return BACKENDS[cfg.train.backend](method, cfg, device)
