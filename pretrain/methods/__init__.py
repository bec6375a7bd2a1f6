"""Methods, found by name through `METHODS`. Importing this package registers them all."""
from __future__ import annotations

from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.methods import simclr  # noqa: F401  (registers)


def create_method(cfg) -> Method:
    """Build the method named by `cfg.method.name` around `create_backbone(cfg.model...)`.

    `cfg` is the resolved run config (pretrain.config.load_config); the method's constructor
    receives its own `method.*` keys as keyword arguments.
    """
    from pretrain.models import create_backbone

    backbone = create_backbone(cfg.model.name, dict(cfg.model.kwargs), cfg.model.cifar_stem)
    kwargs = {k: v for k, v in dict(cfg.method).items() if k != "name"}
    return METHODS.get(cfg.method.name)(backbone, **kwargs)


__all__ = ["METHODS", "Method", "create_method"]
