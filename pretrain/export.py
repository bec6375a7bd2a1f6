"""Export a trained backbone as timm-compatible safetensors (+ a JSON describing it), and load it back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import from_dict
from pretrain.engine.checkpoint import CheckpointError, find_checkpoint, step_of
from pretrain.utils import atomic_path, atomic_write_text


def load_checkpoint_weights(path) -> Tuple[dict, dict, int]:
    """(method state_dict in fp32, config dict, step) from a run dir or checkpoint of any backend, which
    consolidates its own format (DeepSpeed: zero_to_fp32; FSDP2: the model's shards of its DCP checkpoint)."""
    from pretrain.engine.backends import checkpoint_writer

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path}; train first, or pass a run dir that has checkpoints/step_*")
    sd, config = checkpoint_writer(ckpt).consolidate(ckpt)
    return sd, config, step_of(ckpt)


def load_method(path):
    """(method with the newest checkpoint's weights, its config, step) from a run dir or checkpoint."""
    from pretrain.methods import create_method

    sd, config, step = load_checkpoint_weights(path)
    cfg = from_dict(config)
    method = create_method(cfg, warm_start=False)   # the checkpoint's weights, whatever model.pretrained_file says
    method.load_state_dict(sd)
    return method, cfg, step


def export(path, out, which: str = "default") -> Path:
    """Write the method's backbone from the newest checkpoint in `path` to `out` (.safetensors) and
    `out` with .json (timm name, kwargs, input size, mean/std). Loads with
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=out), num_classes=K)`."""
    method, cfg, step = load_method(path)
    if which == "autoencoder":
        return _export_autoencoder(method, cfg, step, Path(out))
    if method.backbone is not None and not method.timm_backbone:
        raise ValueError(f"{cfg.method.name} trained no timm backbone (method.discriminator={cfg.method.get('discriminator')}): "
                         f"there is nothing `pretrain export` can write for timm; train with method.discriminator=timm")
    backbone = method.export_backbone(which)
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    size = cfg.data.image_size
    meta = {"timm_name": cfg.model.name, "model_kwargs": dict(cfg.model.kwargs), "cifar_stem": cfg.model.cifar_stem,
            "input_size": [3, size, size], "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "num_features": backbone.num_features, "method": cfg.method.name, "which": which, "step": step}
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "pretrain": json.dumps(meta)})
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=1))
    return out


def _export_autoencoder(method, cfg, step: int, out: Path) -> Path:
    """A VAE as the frozen autoencoder of latent diffusion (method.autoencoder): every weight, and the run
    config in the safetensors metadata (pretrain.methods.vae.load_autoencoder reads it back)."""
    from pretrain.config import to_dict

    if not hasattr(method, "encode"):
        raise ValueError(f"--which autoencoder exports a vae run's encoder and decoder; this is a {cfg.method.name} run")
    tensors = {k: v.detach().contiguous().cpu() for k, v in method.state_dict().items()}
    meta = {"method": cfg.method.name, "which": "autoencoder", "step": step, "latent_dim": method.latent_dim,
            "config": to_dict(cfg)}
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "pretrain": json.dumps(meta)})
    return out


def load_backbone(path) -> Tuple[torch.nn.Module, dict]:
    """An exported backbone back as (model, meta), built with pretrain.models.create_backbone."""
    from pretrain.models import create_backbone

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone {path} not found; write it with `pretrain export RUN_DIR --out {path}`")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pretrain", "null") or "null")
    if meta is None:
        raise ValueError(f"{path} has no {meta_path.name} and no pretrain metadata; was it written by `pretrain export`?")
    model = create_backbone(meta["timm_name"], meta["model_kwargs"], meta["cifar_stem"])
    model.load_state_dict(load_file(str(path)))
    return model, meta
