"""Training backends: the one place that knows whether DDP or DeepSpeed runs the model.

The loop only calls: `phase(name)`, `accumulate(last)`, `forward(batch, ctx)`, `backward(loss)`,
`step(ctx, need_norm)`, `set_lr(lr, peak, weight_decay, values)`, `save(path, client_state)` and `load(path)`. `module`
is the bare method for hooks and eval. `step` runs the method's `on_gradients(ctx, grads)` hook between the
last backward and the optimizer step, with a `Gradients` view that reads and writes full gradients under
either backend.

Methods with several optimizer phases per step (a GAN's D and G steps, `Method.phases`) get one
optimizer per phase, and inside `phase(name)` only that phase's parameters require gradients, so a
backward never touches the other network's gradients (nor, under DeepSpeed, its engine's hooks).
Gradients are averaged over ranks by DDP for one-phase methods; for several phases, where a
DDP wrapper would expect every parameter in every backward, by one flat all-reduce per phase step.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pretrain import comm
from pretrain.config import ConfigError
from pretrain.engine.checkpoint import CheckpointError
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
    `Method.on_gradients`: plain `.grad` under DDP (GradScaler's unscale_ has run); under DeepSpeed its
    `safe_get_full_grad` / `safe_set_full_grad`, which reach ZeRO's partitioned fp32 gradient buffers (a
    collective under ZeRO-3: every rank must make the same calls), still multiplied by fp16's loss scale
    `scale` until ZeRO's step: divided out here (DeepSpeed fp16 is not testable on CPU)."""

    def __init__(self, deepspeed: bool = False, scale: float = 1.0):
        self.deepspeed, self.scale = deepspeed, scale

    def get(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
            return g if g is None or self.scale == 1.0 else g / self.scale
        return p.grad

    def set(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_grad

            safe_set_full_grad(p, value if self.scale == 1.0 else value * self.scale)
        elif p.grad is None:
            p.grad = value.to(p.dtype).clone()
        else:
            p.grad.copy_(value)

    def zero_(self, params) -> None:
        """Zero gradients: with zero weight decay (or an AdamW state that is still zero) the parameters stay put."""
        for p in params:
            if self.deepspeed:
                self.set(p, torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape, device=p.device))
            elif p.grad is not None:
                p.grad.zero_()


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


class _Phases:
    """`with backend.phase(name):` -- the optimizer phase the next backward/step belong to."""

    _phase = "main"

    @contextlib.contextmanager
    def phase(self, name: str):
        self._phase = name
        with only_training(self.module, name):
            yield


class DDPBackend(_Phases):
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
        if cfg.train.compile:
            self.model = torch.compile(self.model)
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
        if not self.ddp and len(self.module.phases) > 1 and comm.initialized():
            for b in self.module.buffers():   # as DDP does: every rank on rank 0's BN statistics
                dist.broadcast(b, 0)
        return norm

    def set_lr(self, lr: float, peak: Optional[float] = None, weight_decay: Optional[float] = None,
               values: Optional[dict] = None):
        set_group_lrs(self.optimizers.values(), lr, lr if peak is None else peak, weight_decay, values)

    def eval_module(self):
        """The method to run evaluation forwards on, outside the training wrapper."""
        return self.module

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


def _lookup(d, dotted: str):
    """d["a"]["b"] for "a.b" ("" -> d), or None where the path is absent."""
    for part in filter(None, dotted.split(".")):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def deepspeed_config(cfg, world: int) -> dict:
    """Our YAML -> a DeepSpeed config dict; a raw JSON (deepspeed.config_file) and
    deepspeed.overrides are merged on top, so a user can set anything DeepSpeed knows.

    Our keys are the one source of truth for what they cover: DeepSpeed's batch sizes, accumulation,
    clipping, precision and ZeRO stage may only repeat them (or say "auto": ours), and its
    optimizer/scheduler sections, which would fight optim.*, are refused; a contradiction is a
    ConfigError naming both keys."""
    from omegaconf import OmegaConf

    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    gb, acc, prec = cfg.train.global_batch_size, cfg.train.grad_accum, cfg.train.precision
    base = {
        "train_batch_size": gb,
        "train_micro_batch_size_per_gpu": gb // (world * acc),
        "gradient_accumulation_steps": acc,
        "gradient_clipping": float(cfg.train.clip_grad),
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,   # our LARS is a plain torch optimizer
        "steps_per_print": 10 ** 9,
    }
    owned = {   # the DeepSpeed keys set from ours: (our key(s) as an error shows them, the key to set instead)
        "train_batch_size": (f"train.global_batch_size={gb}", "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (f"train.global_batch_size={gb} / ({world} rank(s) x train.grad_accum={acc})",
                                           "train.global_batch_size and train.grad_accum"),
        "gradient_accumulation_steps": (f"train.grad_accum={acc}", "train.grad_accum"),
        "gradient_clipping": (f"train.clip_grad={cfg.train.clip_grad}", "train.clip_grad"),
        "zero_optimization.stage": (f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}", "deepspeed.zero_stage"),
        "bf16.enabled": (f"train.precision={prec}", "train.precision"),
        "bfloat16.enabled": (f"train.precision={prec}", "train.precision"),   # bf16's old name, read only without bf16
        "fp16.enabled": (f"train.precision={prec}", "train.precision"),
    }
    ours = {k: _lookup(base, k.replace("bfloat16.", "bf16.")) for k in owned}
    ds = base
    sources = []   # (how an error names a key of it, its dict), later ones winning
    if cfg.deepspeed.config_file:
        p = Path(cfg.deepspeed.config_file)
        if not p.is_file():
            raise ValueError(f"deepspeed.config_file {p} not found")
        sources.append((f"{{}} in deepspeed.config_file ({p})", json.loads(p.read_text())))
    sources.append(("deepspeed.overrides.{}", OmegaConf.to_container(cfg.deepspeed.overrides)))
    for name, src in sources:
        for key in ("optimizer", "scheduler"):
            if key in src:
                raise ConfigError(f"{name.format(key)} would fight optim.* (pretrain builds the optimizer and sets "
                                  f"the learning rate every step); set optim.* and leave DeepSpeed's {key} out")
        for key, (shown, remedy) in owned.items():
            value = _lookup(src, key)
            if value not in (None, "auto") and value != ours[key]:
                raise ConfigError(f"{name.format(f'{key}={json.dumps(value)}')} contradicts {shown}; "
                                  f"set {remedy} and leave DeepSpeed's {key} out")
        ds = OmegaConf.to_container(OmegaConf.merge(ds, src))
    for key in owned:
        if _lookup(ds, key) == "auto":   # as in HF's DeepSpeed configs: filled in from our keys
            *parents, leaf = key.split(".")
            _lookup(ds, ".".join(parents))[leaf] = ours[key]
    flat = (ds.get("zero_optimization", {}).get("stage", 0) > 0 or ds.get("bf16", {}).get("enabled")
            or ds.get("fp16", {}).get("enabled"))
    if cfg.optim.name == "lars" and flat:
        # ZeRO and DeepSpeed's bf16/fp16 optimizers hand the optimizer flattened (partitioned) parameter
        # groups, so LARS would compute one trust ratio per flat partition instead of one per layer.
        raise ConfigError("optim.name=lars needs per-layer weight norms, which DeepSpeed's ZeRO stages 1-3 and "
                          "its bf16/fp16 optimizers flatten away; use optim.name=adamw or sgd with "
                          "train.backend=deepspeed, or train.backend=ddp (or deepspeed.zero_stage=0 with fp32)")
    if cfg.train.channels_last:
        # the same flattening copies every parameter into a contiguous (NCHW) buffer; ZeRO-0 in fp32
        # would keep NHWC, but is DDP with extra steps: not worth an untested path
        raise ConfigError("train.channels_last=true needs train.backend=ddp: DeepSpeed's ZeRO stages and "
                          "bf16/fp16 optimizers flatten conv weights back to NCHW; set train.channels_last=false "
                          "with train.backend=deepspeed")
    return ds


class DeepSpeedBackend(_Phases):
    """deepspeed.initialize with ZeRO 0-3 and bf16/fp16; DeepSpeed does accumulation and clipping.

    One DeepSpeed engine per optimizer phase, each over its phase's module (a GAN: one for D, one
    for G). One-phase methods go through their engine's forward; several-phase methods are called
    directly (the engines' hooks sit on their modules)."""

    name = "deepspeed"

    def __init__(self, method, cfg, device):
        import deepspeed

        world = comm.world_size()
        if not comm.initialized():  # DeepSpeed insists on a process group, even for one process (no launcher
            # variables to rendezvous with: an in-memory store does for a group of one)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
            for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):   # DeepSpeed asserts on these
                os.environ.setdefault(k, v)
        self.config = deepspeed_config(cfg, world)
        if _precision(cfg) is not None:   # DeepSpeed casts weights, not BN statistics: keep BN math in fp32
            from pretrain.models import convert_to_fp32_bn

            convert_to_fp32_bn(method)
        method.to(device)
        self.engines = {}
        for p, optimizer in build_optimizers(method, cfg).items():
            self.engines[p], _, _, _ = deepspeed.initialize(model=method.phase_module(p), optimizer=optimizer,
                                                            config=self.config)
        self.single = len(method.phases) == 1
        self.model = self.engines[method.phases[0]]
        self.module, self.device = method, device
        self.dtype = _precision(cfg)
        self.cfg = cfg
        self._phase = method.phases[0]

    def accumulate(self, last: bool):
        return contextlib.nullcontext()   # DeepSpeed tracks the accumulation boundary itself

    def forward(self, batch, ctx=None):
        ctx = ctx or self.module.step_context(phase=self._phase)
        if self.dtype is not None and not self.module.casts_inputs:   # bf16/fp16 weights: feed matching inputs
            batch = {k: _cast(v, self.dtype) for k, v in batch.items()}
        return self.model(batch, ctx) if self.single else self.module(batch, ctx)

    def backward(self, loss):
        engine = self.engines[self._phase]
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)   # scales by 1/grad_accum
        if not boundary:        # DeepSpeed counts micro-steps in step(); the boundary's step() waits for step()
            engine.step()

    def step(self, ctx=None, need_norm: bool = True) -> torch.Tensor:
        """The method's on_gradients hook on the accumulated gradients, then the engine's (clipping) step."""
        ctx = ctx or self.module.step_context(phase=self._phase)
        engine = self.engines[ctx.phase]
        scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if self.dtype is torch.float16 else 1.0
        self.module.on_gradients(ctx, Gradients(deepspeed=True, scale=scale))
        engine.step()
        norm = engine.get_global_grad_norm()   # DeepSpeed computes it anyway
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    def set_lr(self, lr: float, peak: Optional[float] = None, weight_decay: Optional[float] = None,
               values: Optional[dict] = None):
        set_group_lrs([e.optimizer for e in self.engines.values()], lr, lr if peak is None else peak, weight_decay,
                      values)

    def _stage3(self) -> bool:
        return self.config["zero_optimization"].get("stage", 0) == 3

    def eval_module(self):
        """The method to run evaluation forwards on. DeepSpeed's module is not always usable as it is:
        under ZeRO-3 its parameters are partitioned and every forward gathers them collectively,
        which hangs or crashes when ranks run different numbers of eval batches; with bf16/fp16 its
        weights are half precision while BatchNorm's running statistics are not, which eval-mode
        BatchNorm rejects. In those cases evaluate a plain fp32 copy (gathered once, on every rank
        together, under ZeRO-3)."""
        if not self._stage3() and self.dtype is None:
            return self.module
        import deepspeed

        from pretrain.methods import create_method

        with torch.random.fork_rng(devices=[]):   # building the copy must not move the training RNG
            copy = create_method(self.cfg, warm_start=False).to(self.device)
        gather = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None) \
            if self._stage3() else contextlib.nullcontext()
        with gather:
            copy.load_state_dict({k: v.detach().clone() for k, v in self.module.state_dict().items()})
        return copy

    def _unmanaged(self) -> dict:
        """State of the method outside every engine's module (e.g. an EMA generator), saved as client state."""
        if self.single:
            return {}
        owned = {id(t) for p in self.module.phases for t in self.module.phase_module(p).state_dict(keep_vars=True).values()}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict(keep_vars=True).items() if id(v) not in owned}

    def save(self, path: Path, client_state: dict):
        """DeepSpeed's own format, a directory (one sub-directory per engine for several phases);
        written as `.tmp-<name>` and renamed by rank 0."""
        tmp = path.parent / f".tmp-{path.name}"
        if self.single:
            self.model.save_checkpoint(str(path.parent), tag=tmp.name, client_state=client_state, save_latest=False)
        else:
            state = dict(client_state, unmanaged=self._unmanaged())
            for p, engine in self.engines.items():
                engine.save_checkpoint(str(tmp), tag=p, client_state=state, save_latest=False)
        comm.barrier()
        if comm.is_main():   # the config in plain JSON too, so export never has to unpickle
            (tmp / "pretrain_config.json").write_text(json.dumps(client_state["config"]))
            tmp.rename(path)
        comm.barrier()

    def load(self, path: Path) -> dict:
        where = {p: (path.parent, path.name) if self.single else (path, p) for p in self.engines}
        for p, engine in self.engines.items():
            ckpt_dir, tag = where[p]
            universal = to_universal(ckpt_dir, tag, comm.world_size())
            if universal:   # tell the engine to read the universal layout (read at load time, not init)
                engine._config.load_universal_checkpoint = True
                ckpt_dir, tag = universal
            _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            engine._config.load_universal_checkpoint = False
        if self.single:
            return client_state
        unmanaged = client_state.pop("unmanaged", {})
        if unmanaged:
            self.module.load_state_dict(unmanaged, strict=False)
        return client_state


def to_universal(ckpt_dir: Path, tag: str, world: int):
    """A ZeRO checkpoint `ckpt_dir/tag` written by a different number of ranks than `world` ->
    (dir, tag) of its conversion to DeepSpeed's universal format (world-size free), made once by
    rank 0 with `deepspeed.checkpoint.ds_to_universal` beside the original; None when the
    checkpoint needs no conversion."""
    from pretrain.engine.logger import log

    saved = len(list((Path(ckpt_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt")))   # one per rank
    if not saved or saved == world:
        return None
    out = Path(ckpt_dir) / f"{tag}.universal"
    if comm.is_main() and not out.is_dir():
        log.warning("%s was written by %d ranks and this run has %d: converting it to DeepSpeed's universal "
                    "checkpoint format in %s (once)", Path(ckpt_dir) / tag, saved, world, out)
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckpt_dir) / tag),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            raise CheckpointError(f"{Path(ckpt_dir) / tag} was written by {saved} ranks; this run has {world}, and "
                                  f"converting it to DeepSpeed's universal format failed ({err}); resume on {saved} ranks")
        tmp.rename(out)
        (Path(ckpt_dir) / "latest_universal").unlink(missing_ok=True)   # the converter's pointer file; we load by tag
    comm.barrier()
    return out.parent, out.name


BACKENDS = {"ddp": DDPBackend, "deepspeed": DeepSpeedBackend}


def create_backend(method, cfg, device):
    if cfg.train.backend not in BACKENDS:
        raise ValueError(f"train.backend must be one of {', '.join(BACKENDS)}, got {cfg.train.backend!r}")
    return BACKENDS[cfg.train.backend](method, cfg, device)
