"""Backbones: any timm model by name, as a pooled feature extractor (num_classes=0)."""
from __future__ import annotations

import difflib
from typing import Optional

import timm
import torch.nn as nn


class ModelError(ValueError):
    """A model setting the user must fix."""


def check_model_name(name: str) -> None:
    arch = name.split(".")[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown timm model '{name}'{hint} (list them with: python -c \"import timm; print(timm.list_models('*res*'))\")")


def create_backbone(name: str, kwargs: Optional[dict] = None, cifar_stem: bool = False) -> nn.Module:
    """Create a timm model without classifier; `model.num_features` is its feature width.

    Args:
        name: timm model name, e.g. "resnet18" or "vit_tiny_patch16_224".
        kwargs: extra timm.create_model arguments, e.g. {"img_size": 32, "patch_size": 4}.
        cifar_stem: for ResNets on small images, a 3x3 stride-1 first conv and no max-pool.
    Weights are never downloaded: these machines have no model hub.
    """
    check_model_name(name)
    kwargs = dict(kwargs or {})
    kwargs.pop("num_classes", None)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise ModelError(f"timm could not build '{name}' with model.kwargs={kwargs}: {e}") from None
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ModelError(f"model.cifar_stem=true needs a timm ResNet; '{name}' has no conv1/maxpool")
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(model.conv1.in_channels, out, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    # Remember how to rebuild this backbone (export writes it next to the weights).
    model.pretrain_spec = {"name": name, "kwargs": kwargs, "cifar_stem": cifar_stem}
    return model
