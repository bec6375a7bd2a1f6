"""`pretrain finetune BACKBONE --train SHARDS --val SHARDS [--config YAML] [key=value ...]`: fine-tune an
exported backbone (pretrain export) with the `finetune` method (pretrain/methods/finetune.py) on the engine.

The run's config is built in layers, later ones winning:

    defaults -> what the export and the shards say (model.name, model.kwargs.*, model.cifar_stem, data.image_size,
    data.mean/std from the export's JSON; method.num_classes from the train shards' index.json), for the keys the
    config file and the overrides leave unset -> the config file (default configs/finetune_vit_base_mae.yaml) ->
    key=value overrides -> method.name=finetune, model.pretrained_file=BACKBONE, data.train, data.val

`run()` is the whole command as a function (also for `pretrain eval all --finetune`); it returns the JSON line's
fields in the eval schema: {"eval": "finetune", "backbone", "top1", "train", "val", "epochs"}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

#: the recipe `pretrain finetune` uses without --config: MAE's ViT-B fine-tuning (FINETUNE.md)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune_vit_base_mae.yaml"


def export_meta(backbone) -> dict:
    """The JSON `pretrain export` wrote next to (or into) `backbone`, after checking that the weights load into
    the model it describes; one-line errors for a missing file or one that is not such an export."""
    from safetensors import SafetensorError

    from pretrain.export import load_backbone

    try:
        _, meta = load_backbone(backbone)
    except (SafetensorError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{backbone} is not a backbone written by `pretrain export` "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); export one with "
                         f"`pretrain export RUN_DIR --out {backbone}`") from None
    return meta


def index_classes(spec) -> Optional[int]:
    """How many classes a split directory's index.json lists (`pretrain shards` writes them), else None."""
    path = Path(spec) / "index.json" if isinstance(spec, (str, Path)) else None
    if path is None or not path.is_file():
        return None
    classes = json.loads(path.read_text()).get("classes")
    return len(classes) if classes else None


def check_labelled(spec, key: str) -> None:
    """A one-line error unless the first sample of `spec` has a .cls label."""
    from pretrain.data import DataError, eval_loader

    batch = next(iter(eval_loader(spec, 1, 8, max_samples=1, key=key)), None)
    if batch is None:
        raise DataError(f"{key} {spec}: no readable sample")
    if int(batch["label"][0]) < 0:
        raise DataError(f"{key} {spec} has no .cls labels; fine-tuning needs labelled shards "
                        f"(`pretrain shards` writes them from a folder of class subfolders)")


def _explicit_keys(config, overrides: Sequence[str]) -> set:
    """Every dotted key the config file (with its _base_ chain) or the overrides set, inside model.kwargs too."""
    from omegaconf import OmegaConf

    from pretrain.config import _load_experiment, _parse_overrides

    def keys(d, prefix=""):
        for k, v in d.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    layers = [layer for layer, _ in _load_experiment(Path(config))] if config else []
    layers.append(_parse_overrides(list(overrides)))
    return {k for layer in layers for k in keys(OmegaConf.to_container(layer))}


def finetune_config(backbone, train, val, overrides: Sequence[str] = (), config=None):
    """The run config of `pretrain finetune` (module docstring), checked: labelled shards, enough classes,
    an even per-rank batch when mixing."""
    from pretrain.config import ConfigError, batch_split, load_config
    from pretrain.dist import env_from
    from pretrain.methods.finetune import odd_batch_error

    config = DEFAULT_CONFIG if config is None else config
    meta = export_meta(backbone)
    check_labelled(train, "--train")
    check_labelled(val, "--val")
    derived = {"model.name": meta["timm_name"], "model.cifar_stem": meta.get("cifar_stem", False),
               "data.image_size": meta["input_size"][-1], "data.mean": meta["mean"], "data.std": meta["std"],
               **{f"model.kwargs.{k}": v for k, v in meta["model_kwargs"].items()}}
    classes = index_classes(train)
    if classes:
        derived["method.num_classes"] = classes
    explicit = _explicit_keys(config, overrides)
    forced = {"method.name": "finetune", "model.pretrained_file": str(backbone), "data.train": train, "data.val": val}
    layer = [f"{k}={json.dumps(v)}" for k, v in derived.items() if k not in explicit]
    cfg = load_config(str(config), [*layer, *overrides, *(f"{k}={json.dumps(str(v))}" for k, v in forced.items())])
    if classes and cfg.method.num_classes < classes:
        raise ConfigError(f"method.num_classes={cfg.method.num_classes} but the train shards' index.json lists {classes} "
                          f"classes; set method.num_classes={classes} (or leave it out: it is read from there)")
    m = cfg.method
    if (m.mixup_alpha > 0 or m.cutmix_alpha > 0) and m.mixup_prob > 0 and batch_split(cfg, env_from().world_size) % 2:
        raise ConfigError(odd_batch_error(batch_split(cfg, env_from().world_size)))
    return cfg


def run(backbone, train, val, overrides: Sequence[str] = (), config=None) -> dict:
    """Fine-tune `backbone` (an exported .safetensors) on the labelled `train` shards, top-1 on `val` each
    eval.every_epochs and at the end; every rank returns the eval-schema dict (the process group is torn down)."""
    from pretrain.data import count_samples
    from pretrain.dist import cleanup, env_from
    from pretrain.engine import train as train_run
    from pretrain.engine.trainer import plan

    cfg = finetune_config(backbone, train, val, overrides, config)
    p = plan(cfg, env_from().world_size)
    metrics = train_run(cfg)
    cleanup()
    out = {"eval": "finetune", "backbone": str(backbone), "top1": round(metrics["top1"], 4) if "top1" in metrics else None,
           "train": count_samples(cfg.data.train), "val": metrics.get("val_samples"),
           "epochs": round(p["total"] / p["steps_per_epoch"], 4)}
    if metrics.get("preempted"):   # stopped early with a checkpoint: the same command continues it (resume=auto)
        return {**out, "preempted": metrics["preempted"], "requeued": metrics["requeued"]}
    if not metrics:
        raise ValueError(f"run_dir {cfg.run_dir} already holds a finished run of {p['total']} steps, so nothing was "
                         f"trained or scored; pass run_dir=NEW_DIR, or resume=never overwrite=archive")
    if out["top1"] is None:
        raise ValueError(f"no top-1 was measured (eval.monitor={cfg.eval.monitor}); leave eval.monitor=auto")
    return out
