"""Methods, found by name through `METHODS`. Importing this package registers them all."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from omegaconf import OmegaConf

from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.params import validate
from pretrain.schedules import Schedule

# every module of this package is imported, which registers its methods: a new method is one new file
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")


def create_method(cfg, warm_start: bool = True) -> Method:
    """Build the method named by `cfg.method.name` around `create_backbone(cfg.model...)`.

    With `warm_start` and `cfg.model.pretrained_file` set, the backbone gets that file's weights before the
    method is built (so EMA teachers and momentum encoders start from them); callers that load a checkpoint
    over the method afterwards (resume, export) pass warm_start=False.

    `cfg` is the resolved run config (pretrain.config.load_config); the method's constructor
    receives its own `method.*` keys as keyword arguments (except those it lists in `scheduled`: they become
    `method.schedules` and reach its hooks through the step context), plus `image_size=cfg.data.image_size`
    when it takes one (CPC, to lay out its patch grid).
    """
    from pretrain.config import ConfigError
    from pretrain.models import check_input_size, create_backbone

    cls = METHODS.get(cfg.method.name)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    validate(cls, kwargs)   # before anything is built: a bad method.* value fails at once
    backbone = None
    if cls.uses_backbone({**cls.defaults, **kwargs}):
        backbone = create_backbone(cfg.model.name, dict(cfg.model.kwargs), cfg.model.cifar_stem,
                                   cfg.model.get("pretrained_file") if warm_start else None,
                                   bool(cfg.model.get("grad_checkpointing", False)))
    if "image_size" in inspect.signature(cls.__init__).parameters:
        kwargs["image_size"] = cfg.data.image_size
    mean_std = getattr(cls, "pixel_mean_std", None)
    if mean_std and (list(cfg.data.mean) != [mean_std[0]] * 3 or list(cfg.data.std) != [mean_std[1]] * 3):
        raise ConfigError(f"method.name={cfg.method.name} models pixels in [-1, 1]: set data.mean=[0.5,0.5,0.5] "
                          f"data.std=[0.5,0.5,0.5] (see configs/digits_{cfg.method.name}.yaml)")
    scheduled = {k: Schedule.parse(kwargs.pop(k)) for k in cls.scheduled if k in kwargs}   # read through ctx only
    method = cls(backbone, **kwargs)
    method.schedules.update(scheduled)
    if backbone is not None:
        check_input_size(backbone, method.backbone_input_size(cfg.data.image_size), cfg.model.name)
    return method


__all__ = ["METHODS", "Method", "create_method"]
