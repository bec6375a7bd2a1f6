"""The FSDP2 backend (`train.backend=fsdp`): torch's `fully_shard` per transformer block / ResNet stage, then
the root (the whole method, its heads, teachers and momentum encoders included).

Every parameter becomes a DTensor sharded on dim 0 over the ranks; a unit's full weights exist only
during its forward and backward (all-gathered, then freed). Gradients are reduce-scattered (averaged)
to the shards and the optimizer steps on the shards, so parameters, gradients and optimizer state
per rank are ~1/W of DDP's (with train.grad_accum > 1, full gradients live between micro-batches: see
`accumulate`). Buffers (BN statistics) are not sharded: every rank gets rank 0's after each step, as
under DDP. A teacher or momentum encoder is a module of the method, so it is sharded
by the same rule into the same shapes: its EMA update (pretrain.models.ema) is a shard-by-shard lerp
with no communication and no gathered copy.

Precision (train.precision): bf16 keeps fp32 sharded parameters (the master weights and the optimizer
state) and all-gathers bf16 copies for compute, with gradients reduced in fp32
(MixedPrecisionPolicy(bf16, fp32)). fp16 (it would need a sharded loss scaler) is refused.

Checkpoints use torch.distributed.checkpoint (DCP): a directory of per-rank shard files, written under a
temporary name and renamed into place, loadable on any number of ranks (DCP re-shards on load). Export
reads only the model's entries of it, in one process. DCP unpickles its metadata and non-tensor entries
with no restriction; `SafeReader` and `SafeLoadPlanner` restrict both to the types DCP itself writes.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from pretrain import comm
from pretrain.config import ConfigError
from pretrain.engine.backends import CONFIG_JSON, Backend, Gradients, _cast, _precision, broadcast_buffers, \
    build_optimizers, single_process_group
from pretrain.engine.compile import compile_method

#: a checkpoint's client state (step, config, RNG states, data positions, extra state), torch.save by rank 0
CLIENT_PT = "client_state.pt"
_UNIT = re.compile(r"(.*\.)?(layer\d+|(\w*blocks|stages)\.\d+)$")


def shard_units(method: nn.Module) -> List[nn.Module]:
    """The modules `fully_shard` wraps before the root, innermost first: every element of a `blocks` /
    `*_blocks` / `stages` sequence (timm ViT blocks, MAE's decoder blocks, ConvNeXt stages) and every ResNet
    stage `layer<N>`, wherever they sit in the method (student, teacher, momentum encoder)."""
    return [m for name, m in reversed(list(method.named_modules())) if _UNIT.fullmatch(name)]


def checkpoint_units(method: nn.Module, units: List[nn.Module]) -> None:
    """model.grad_checkpointing under FSDP2: each unit's forward recomputed in its backward, inside the unit (as
    torchtitan does). timm's own checkpointing (`checkpoint_seq` over a model's blocks or stages) is turned off:
    its recomputation of a sequence spans several units, whose weights FSDP has resharded by then. The
    backbone's BatchNorm-statistics hook (pretrain.models.backbone) still undoes the recomputation's second
    update."""
    for m in method.modules():
        if getattr(m, "grad_checkpointing", False) is True and hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(False)
    for unit in units:
        inner = unit.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():   # teachers, eval: nothing is kept, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        unit.forward = forward


def check_fsdp(cfg, method) -> None:
    """One-line errors for what the FSDP2 backend does not do."""
    if len(method.phases) > 1:
        raise ConfigError(f"{cfg.method.name} steps {len(method.phases)} optimizers per step ({', '.join(method.phases)}), "
                          f"which train.backend=fsdp does not support; use train.backend=ddp or deepspeed")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 with train.backend=fsdp needs a sharded loss scaler, which this backend "
                          "does not have; use train.precision=bf16 (or fp32)")
    if cfg.train.channels_last:
        raise ConfigError("train.channels_last=true needs train.backend=ddp: FSDP2 flattens parameters into "
                          "contiguous shards; set train.channels_last=false with train.backend=fsdp")


class FSDPBackend(Backend):
    """torch FSDP2 (`fully_shard`) with bf16 compute / fp32 master and reduce; DCP checkpoints."""

    name = "fsdp"

    def __init__(self, method, cfg, device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        check_fsdp(cfg, method)
        single_process_group(device)
        self.dtype = _precision(cfg)
        if self.dtype is not None:   # compute weights are bf16, BN statistics are not: keep BN math in fp32
            from pretrain.models import convert_to_fp32_bn

            convert_to_fp32_bn(method)
        method.to(device)
        reduce = torch.float32 if self.dtype is not None else None
        reshard = bool(cfg.fsdp.reshard_after_forward)
        units = shard_units(method)
        if cfg.model.grad_checkpointing:
            checkpoint_units(method, units)
        for unit in units:
            fully_shard(unit, mp_policy=MixedPrecisionPolicy(self.dtype, reduce), reshard_after_forward=reshard)
        # the root's inputs are cast here (forward), as DeepSpeed's: a method may ask for its inputs as they are
        fully_shard(method, mp_policy=MixedPrecisionPolicy(self.dtype, reduce, cast_forward_inputs=False),
                    reshard_after_forward=reshard)
        self.module = method
        self.model = compile_method(method, cfg)          # train.compile: around the sharded method
        self.optimizers = build_optimizers(method, cfg)   # over the DTensor shards
        self.device, self.cfg, self.accum, self.clip = device, cfg, cfg.train.grad_accum, cfg.train.clip_grad
        self._phase = method.phases[0]

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        # no reduce-scatter on all but the last micro-batch: the unsharded gradients accumulate locally, so
        # with train.grad_accum > 1 each rank holds full fp32 gradients (4 psi bytes) between micro-batches,
        # the communication of one reduce-scatter per step bought with memory (torchtitan reduce-scatters
        # every micro-batch instead)
        self.module.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def forward(self, batch, ctx=None):
        ctx = ctx or self.module.step_context(phase=self._phase)
        if self.dtype is not None and not self.module.casts_inputs:   # bf16 compute weights: matching inputs
            batch = {k: _cast(v, self.dtype) for k, v in batch.items()}
        return self.model(batch, ctx)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self, ctx=None, need_norm: bool = True) -> Optional[torch.Tensor]:
        """on_gradients (full gradients gathered per parameter), clipping by the global norm over the shards,
        and the optimizer step on the shards."""
        ctx = ctx or self.module.step_context(phase=self._phase)
        opt = self.optimizers[ctx.phase]
        self.module.on_gradients(ctx, Gradients())
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = None
        if self.clip > 0 or need_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else float("inf"))
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        broadcast_buffers(self.module)   # FSDP2 leaves buffers per rank: rank 0's BN statistics, as DDP
        return norm

    def optimizers_(self) -> list:
        return list(self.optimizers.values())

    def eval_module(self):
        """A plain copy of the method with the full weights (all-gathered on every rank together: a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        copy = self._plain_copy()
        copy.load_state_dict(full)
        return copy

    # ---- checkpoints: torch.distributed.checkpoint -------------------------------------------------
    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizers_())
        return {"model": model, "optim": optim}

    def save(self, path: Path, client_state: dict):
        """Every rank writes its shards (DCP) to `.tmp-<name>`; rank 0 adds the client state and renames it."""
        tmp = path.parent / f".tmp-{path.name}"
        if comm.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
        # replicated entries (buffers, step counters) written by the lowest rank holding them: rank 0's
        dcp.save(self._state(), checkpoint_id=str(tmp), planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        comm.barrier()
        if comm.is_main():
            torch.save(client_state, tmp / CLIENT_PT)
            (tmp / CONFIG_JSON).write_text(json.dumps(client_state["config"]))   # plain JSON, for export
            tmp.rename(path)
        comm.barrier()

    def load(self, path: Path) -> dict:
        """Shards for this world size (DCP re-shards a checkpoint written by another one)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        set_state_dict(self.module, self.optimizers_(), model_state_dict=state["model"], optim_state_dict=state["optim"])
        return torch.load(path / CLIENT_PT, map_location="cpu", weights_only=True)

    @classmethod
    def consolidate(cls, path: Path):
        """The model's entries only (not the optimizer's), read whole into one process: no process group."""
        reader = SafeReader(path)
        meta = reader.read_metadata().state_dict_metadata
        model = {k[len("model."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": model}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        config = json.loads((path / CONFIG_JSON).read_text())
        return {k: v.float() if v.is_floating_point() else v for k, v in model.items()}, config


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP `.metadata` file is made of, each named exactly: no module-wide allowance (its
    functions would be reachable) and no dotted name (pickle follows one attribute by attribute)."""

    def find_class(self, module, name):
        if "." not in name:
            if (module, name) in _SAFE:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                             torch.memory_format)):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"a DCP checkpoint's metadata names {module}.{name}, which a DCP checkpoint "
                                     f"does not contain; refusing to load it")


_DCP = "torch.distributed.checkpoint."
_SAFE = {*((_DCP + "metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                            "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                            "_MEM_FORMAT_ENCODING")),
         (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
         ("torch._utils", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
         ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class SafeReader(FileSystemReader):
    """DCP's file reader, with its metadata read by a restricted unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor entries (optimizer param-group values) read with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


