"""Config: packaged defaults <- experiment YAML <- `key=value` overrides (DINOv2 style).

Every key must exist in the defaults (or in the chosen method's `defaults`); an unknown key is an
error naming the closest valid key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

DEFAULTS = Path(__file__).parent / "configs" / "default.yaml"
OPEN_KEYS = {"model.kwargs", "deepspeed.overrides"}  # free-form mappings


class ConfigError(ValueError):
    """A config problem the user must fix; the message says what and how."""


def _flat_keys(cfg, prefix="") -> List[str]:
    out = []
    if isinstance(cfg, (DictConfig, dict)):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            out.append(full)
            if full in OPEN_KEYS:
                continue
            v = cfg[k] if isinstance(cfg, dict) else cfg._get_node(k)
            if isinstance(v, (DictConfig, dict)):
                out.extend(_flat_keys(v, full + "."))
    return out


def _check_keys(base: DictConfig, update, source: str) -> None:
    valid = set(_flat_keys(base))
    # values that may be schedule mappings (pretrain/schedules.py): the schedule parser checks their keys
    schedulable = {f"method.{k}" for k in base.method.keys() if k != "name"} | {"optim.weight_decay"}
    for key in _flat_keys(update):
        if key in valid or any(key.startswith(o + ".") for o in OPEN_KEYS | schedulable):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint} (see pretrain/configs/default.yaml)")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value, e.g. train.epochs=5")
    return OmegaConf.from_dotlist(list(overrides))


def method_defaults(name: str) -> dict:
    from pretrain.methods import METHODS  # the library registry; importing it registers all methods

    try:
        cls = METHODS.get(name)
    except KeyError as e:
        raise ConfigError(f"method.name: {e.args[0]}") from None
    return {"name": name, **getattr(cls, "defaults", {})}


def _load_experiment(path: Path, seen=()) -> List[tuple]:
    """[(layer, source), ...] for an experiment file and the `_base_` files it extends, bases first.
    `_base_: other.yaml` is relative to the file that names it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML such as configs/simclr_resnet18.yaml")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself through _base_; remove the cycle")
    layer = OmegaConf.load(path)
    base = layer.pop("_base_", None)
    layers = _load_experiment(path.parent / base, seen + (path.resolve(),)) if base else []
    return layers + [(layer, str(path))]


def load_config(experiment: Optional[str] = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Load defaults, then the experiment file (after the `_base_` files it extends), then
    `key=value` overrides; validate keys.

    The `method` section is extended with the defaults that the chosen method declares, so that
    each method owns its hyper-parameters. A layer that switches `method.name` drops the method
    keys of the layers before it (they belong to another method): `configs/quickstart_digits.yaml
    method.name=cpc` is CPC with CPC's defaults.
    """
    cfg = OmegaConf.load(DEFAULTS)
    layers = _load_experiment(Path(experiment)) if experiment else []
    layers.append((_parse_overrides(list(overrides)), "command-line overrides"))
    # The method name decides which method keys are valid, so find it first.
    name, names = cfg.method.name, []
    for layer, _ in layers:
        name = OmegaConf.select(layer, "method.name", default=name)
        names.append(name)
    cfg.method = OmegaConf.create(method_defaults(name))
    for (layer, source), layer_name in zip(layers, names):
        if layer_name != name and "method" in layer:
            layer = OmegaConf.masked_copy(layer, [k for k in layer.keys() if k != "method"])
        _check_keys(cfg, layer, source)
        cfg = OmegaConf.merge(cfg, layer)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' must be set, e.g. {missing[0]}=data/shards/train")
    return cfg


def batch_split(cfg: DictConfig, world: int) -> int:
    """The per-rank micro-batch: train.global_batch_size / (world x train.grad_accum), which must divide."""
    gb, acc = cfg.train.global_batch_size, cfg.train.grad_accum
    if gb % (world * acc):
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by world size {world} x "
                          f"train.grad_accum {acc}; pick a multiple of {world * acc}")
    return gb // (world * acc)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(d: dict) -> DictConfig:
    return OmegaConf.create(d)


def save_config(cfg: DictConfig, path) -> None:
    from pretrain.utils import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


__all__ = ["ConfigError", "batch_split", "load_config", "save_config", "to_dict", "from_dict", "ListConfig"]
