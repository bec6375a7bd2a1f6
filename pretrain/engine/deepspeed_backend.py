"""The DeepSpeed backend: ZeRO 0-3 with bf16/fp16 through `deepspeed.initialize`, its checkpoint layout
(DeepSpeed's own directories; a universal conversion to resume on another world size) and its
consolidation for export (DeepSpeed's zero_to_fp32)."""
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

from pretrain import comm
from pretrain.config import ConfigError
from pretrain.engine.backends import (CONFIG_JSON, Backend, Gradients, _cast, _precision, build_optimizers,
                                      single_process_group)
from pretrain.engine.checkpoint import CheckpointError

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
    if cfg.train.compile not in (None, False):
        shown = str(cfg.train.compile).lower() if isinstance(cfg.train.compile, bool) else cfg.train.compile
        raise ConfigError(f"train.compile={shown} is not wired into DeepSpeed's engine here; use "
                          f"train.backend=ddp or fsdp to compile, or train.compile=false with train.backend=deepspeed")
    if cfg.train.channels_last:
        # the same flattening copies every parameter into a contiguous (NCHW) buffer; ZeRO-0 in fp32
        # would keep NHWC, but is DDP with extra steps: not worth an untested path
        raise ConfigError("train.channels_last=true needs train.backend=ddp: DeepSpeed's ZeRO stages and "
                          "bf16/fp16 optimizers flatten conv weights back to NCHW; set train.channels_last=false "
                          "with train.backend=deepspeed")
    return ds


class DeepSpeedBackend(Backend):
    """deepspeed.initialize with ZeRO 0-3 and bf16/fp16; DeepSpeed does accumulation and clipping.

    One DeepSpeed engine per optimizer phase, each over its phase's module (a GAN: one for D, one
    for G). One-phase methods go through their engine's forward; several-phase methods are called
    directly (the engines' hooks sit on their modules)."""

    name = "deepspeed"

    def __init__(self, method, cfg, device):
        import deepspeed

        world = comm.world_size()
        single_process_group(device)
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

    def optimizers_(self) -> list:
        return [e.optimizer for e in self.engines.values()]

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

        copy = self._plain_copy()
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
            (tmp / CONFIG_JSON).write_text(json.dumps(client_state["config"]))
            if not self.single:   # each engine saved its module's keys: how they map to the method's
                (tmp / KEYS_JSON).write_text(json.dumps(self._key_map()))
            tmp.rename(path)
        comm.barrier()

    def _key_map(self) -> dict:
        """{phase: {key in its engine's module: key in the method}} (the live tensors are the same objects)."""
        full = {id(v): k for k, v in self.module.state_dict(keep_vars=True).items()}
        return {p: {k: full[id(v)] for k, v in self.module.phase_module(p).state_dict(keep_vars=True).items()}
                for p in self.engines}

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

    @classmethod
    def consolidate(cls, path: Path):
        """ZeRO 1/2/3 partitions merged by DeepSpeed's zero_to_fp32 (stage 0: the model-states file); several
        engines' parts put under the method's keys by the map `save` wrote, with what no engine owned."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        config = json.loads((path / CONFIG_JSON).read_text())
        if not (path / KEYS_JSON).is_file():   # one engine over the whole method
            if any(d.is_dir() and not d.name.startswith("global_step") for d in path.iterdir()):
                raise CheckpointError(f"{path} holds one DeepSpeed engine per optimizer phase but no {KEYS_JSON} "
                                      f"(written before it existed); resume it with train.backend=deepspeed for one "
                                      f"more checkpoint, then export that one")
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
            except (ValueError, FileNotFoundError):  # ZeRO stage 0: weights sit in the model-states file
                sd = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            return _fp32(sd), config
        sd = {}
        for phase, keys in json.loads((path / KEYS_JSON).read_text()).items():
            part = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=phase)
            # buffers (BN statistics) are not in the fp32 partitions: take them from the module states file
            states = torch.load(path / phase / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            sd.update({keys[k]: v for k, v in {**states["module"], **part}.items()})
            sd.update(states.get("unmanaged", {}))
        return _fp32(sd), config


#: several engines' checkpoints: {phase: {engine key: method key}} in JSON
KEYS_JSON = "pretrain_keys.json"


def _fp32(sd: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


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
