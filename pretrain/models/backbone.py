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


def check_patch_size(model: nn.Module, name: str) -> None:
    """ViT-style models: the image side must be a multiple of the patch size (timm would silently
    drop the remainder)."""
    pe = getattr(model, "patch_embed", None)
    img, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if img is None or patch is None:
        return
    for i, p in zip(img, patch):
        if i % p:
            raise ModelError(f"model.kwargs.img_size={i} is not divisible by the patch size {p} of '{name}'; "
                             f"use a multiple of {p} (e.g. {max(p, i // p * p)}) or set model.kwargs.patch_size")


def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """A fixed-size ViT must be built for the size it will be fed (data.image_size, or a method's patches)."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is None or getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return
    if tuple(img) != (size, size):
        raise ModelError(f"'{name}' is built for {img[0]} px inputs but will get {size} px; "
                         f"set model.kwargs.img_size={size}")


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
    check_patch_size(model, name)
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ModelError(f"model.cifar_stem=true needs a timm ResNet; '{name}' has no conv1/maxpool")
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(model.conv1.in_channels, out, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    # Remember how to rebuild this backbone (export writes it next to the weights).
    model.pretrain_spec = {"name": name, "kwargs": kwargs, "cifar_stem": cifar_stem}
    return model
