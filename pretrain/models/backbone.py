"""Backbones: any timm model by name, as a pooled feature extractor (num_classes=0), optionally warm-started
from a timm-format safetensors file (model.pretrained_file)."""
from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
from timm.models import checkpoint_seq

log = logging.getLogger(__name__)


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


def create_backbone(name: str, kwargs: Optional[dict] = None, cifar_stem: bool = False,
                    pretrained_file: Optional[str] = None, grad_checkpointing: bool = False) -> nn.Module:
    """Create a timm model without classifier; `model.num_features` is its feature width.

    Args:
        name: timm model name, e.g. "resnet18" or "vit_tiny_patch16_224".
        kwargs: extra timm.create_model arguments, e.g. {"img_size": 32, "patch_size": 4}.
        cifar_stem: for ResNets on small images, a 3x3 stride-1 first conv and no max-pool.
        pretrained_file: a timm-format .safetensors to start from (`load_pretrained`), or None.
        grad_checkpointing: timm's activation checkpointing (`set_grad_checkpointing`, see `enable_grad_checkpointing`).
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
    if pretrained_file is not None:
        load_pretrained(model, pretrained_file)
        model.pretrain_spec["pretrained_file"] = str(pretrained_file)   # methods that initialise it leave it (MAE)
    if grad_checkpointing:
        enable_grad_checkpointing(model, name)
    return model


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """model.grad_checkpointing=true: timm's `set_grad_checkpointing(True)`, which recomputes each block's
    (ViT) or stage's (ResNet) activations in the backward instead of keeping them (torch.utils.checkpoint,
    non-reentrant). Copies of the backbone (EMA teachers, momentum encoders) inherit the flag; they run under
    no_grad, where nothing is kept anyway. A model whose timm class has no support is a one-line ModelError."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError) as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise ModelError(f"model.grad_checkpointing=true: timm's '{name}' ({type(model).__name__}) does not support "
                         f"activation checkpointing ({why}); set model.grad_checkpointing=false or pick another model") from None
    model.register_forward_hook(_keep_bn_stats)


def _bn_buffers(model: nn.Module):
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def _keep_bn_stats(model: nn.Module, args, out) -> None:
    """Forward hook of a checkpointed backbone: the backward's recomputation runs the BatchNorms a second time in
    training mode, which would update their running statistics (and num_batches_tracked) twice per forward. So
    the statistics after the (last) forward are kept and put back when the backward ends (a callback queued on
    the autograd engine from the output's gradient hook). Backbones without BatchNorm (ViTs) skip it."""
    if not (model.training and torch.is_tensor(out) and out.requires_grad):
        return
    buffers = _bn_buffers(model)   # found now: sync_bn/fp32 conversions may have replaced the modules
    if not buffers:
        return
    model._bn_kept = [(b, b.detach().clone()) for b in buffers]

    def restore():
        for b, kept in getattr(model, "_bn_kept", ()):   # the newest forward's (several forwards, one backward)
            b.copy_(kept)

    def on_grad(g):
        torch.autograd.Variable._execution_engine.queue_callback(restore)
        return g

    out.register_hook(on_grad)


def run_blocks(blocks: nn.Module, x, checkpoint: bool):
    """`blocks(x)` for a method's own stack of blocks (MAE's decoder, I-JEPA's predictor), checkpointed block by
    block like the backbone's when `checkpoint` (the backbone's `grad_checkpointing`) and gradients are on."""
    if checkpoint and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def load_pretrained(model: nn.Module, path) -> nn.Module:
    """Load the timm-format safetensors file `path` into `model` (a create_backbone model) in place: a
    `pretrain export` output, or a timm hub `model.safetensors` (its classifier keys, named by the model's
    pretrained_cfg["classifier"], are dropped). A timm VisionTransformer goes through timm's own
    checkpoint_filter_fn, which resamples a position embedding of another grid (another img_size;
    prefix tokens kept) as timm's loader does. Anything else that does not match (a key missing or extra, a
    shape) is a one-line ModelError naming the first offending key; pickles are never read."""
    from safetensors import SafetensorError, safe_open

    where = f"model.pretrained_file={path}"
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise ModelError(f"{where} not found; pass a .safetensors written by `pretrain export` or a timm "
                         f"model.safetensors (or model.pretrained_file=null to start from random weights)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pretrain") or "null")
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{where} is not a safetensors file ({str(e).splitlines()[0][:120]}); pickled checkpoints "
                         f"(.pt/.pth/.bin) are never unpickled: save the state_dict with safetensors.torch.save_file, "
                         f"or use `pretrain export`") from None
    own = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = [heads] if isinstance(heads, str) else list(heads or [])
    sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    hint = _source_hint(model, meta)
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        try:
            sd = timm.models.vision_transformer.checkpoint_filter_fn(sd, model)
        except (RuntimeError, ValueError, AssertionError, KeyError, TypeError) as e:
            raise ModelError(f"{where}: timm could not adapt the file to the model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}){hint}") from None
    fix = "build model.name/model.kwargs like the model that wrote it"
    # BatchNorm fills in a missing num_batches_tracked itself (older timm files lack it)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(f"{where}: key '{missing[0]}' is missing from the file{_count(missing[0], own, sd)}; {fix}{hint}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ModelError(f"{where}: the file's key '{extra[0]}' is not in the model{_count(extra[0], own, sd)}; {fix}{hint}")
    for k, t in own.items():   # in the model's order: the first mismatch is the earliest layer's
        if k in sd and tuple(sd[k].shape) != tuple(t.shape):
            raise ModelError(f"{where}: key '{k}' has shape {list(sd[k].shape)} in the file but {list(t.shape)} in "
                             f"the model; {fix}{hint}")
    model.load_state_dict(sd)
    log.info("warm start: %d tensors from %s", len(sd), path)
    return model


def _count(key: str, own: dict, sd: dict) -> str:
    """' (the model has 4 blocks, the file 2)' when `key` sits in a numbered list whose lengths differ."""
    m = re.match(r"(.+?)\.(\d+)\.", key)
    if not m:
        return ""
    pat = re.compile(re.escape(m.group(1)) + r"\.(\d+)\.")
    n_own, n_file = (len({pm.group(1) for pm in map(pat.match, d) if pm}) for d in (own, sd))
    return f" (the model has {n_own} {m.group(1)}, the file {n_file})" if n_own != n_file else ""


def _source_hint(model: nn.Module, meta) -> str:
    """'; the file was exported from ... (this config: ...)' when our export's metadata names another model."""
    spec = getattr(model, "pretrain_spec", None)
    if not meta or not spec:
        return ""
    theirs = (meta.get("timm_name"), meta.get("model_kwargs") or {}, bool(meta.get("cifar_stem")))
    ours = (spec["name"], spec["kwargs"], bool(spec["cifar_stem"]))
    if theirs == ours:
        return ""
    return (f"; the file was exported from model.name={theirs[0]} model.kwargs={json.dumps(theirs[1])} "
            f"model.cifar_stem={str(theirs[2]).lower()} (this config: model.name={ours[0]} "
            f"model.kwargs={json.dumps(ours[1])} model.cifar_stem={str(ours[2]).lower()})")
