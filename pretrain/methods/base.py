"""The method interface every pretraining method implements.

A method is an nn.Module that owns a backbone plus whatever heads it needs, and returns a dict of
losses from `training_step(batch)`; the engine backpropagates `losses["loss"]` and logs the rest.
`forward` is `training_step`, so DDP and DeepSpeed wrappers see the whole method.

Every hook gets the step's `StepContext` (pretrain/schedules.py): `ctx.step`, `ctx.epoch`, `ctx.phase` and
ctx[name], the value at this step of each hyper-parameter the method lists in `scheduled` (config: a
number or a schedule mapping), so one signature serves every method:

    before_step(ctx) -> training_step(batch, ctx) -> backward -> on_gradients(ctx, grads) -> optimizer step
    -> after_step(ctx)

batch["views"] holds the views the method declares (`views`), one tensor per view size, in declared
order: [V_g, B, 3, S_g, S_g] each (pretrain/data/views.py). A two-view method of one size unpacks
`v1, v2 = batch["views"][0]`; a multi-crop method runs its backbone once per tensor.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from pretrain.data.views import ViewSpec
from pretrain.models.ema import EMA
from pretrain.schedules import Schedule, StepContext


def split_views(batch) -> List[torch.Tensor]:
    """Every view of batch["views"], [B, 3, S_v, S_v] each, in the order the method declares them."""
    return [v for group in batch["views"] for v in group]


def no_weight_decay_names(module: nn.Module) -> Set[str]:
    """Full parameter names (or fnmatch patterns) that the submodules of `module` exclude from
    weight decay through timm's `no_weight_decay()` convention, prefixed with their module path."""
    out = set()
    for prefix, m in module.named_modules():
        if callable(getattr(m, "no_weight_decay", None)):
            out |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    return out


def rule_groups(module: nn.Module, weight_decay: float, no_decay: Callable[[str, nn.Parameter], bool],
                lr_scale: Optional[Callable[[str], float]] = None) -> List[dict]:
    """Parameter groups by rule: the trainable parameters of `module` split by (decayed or not, LR scale).
    `no_decay(name, p)`: no weight decay (and no LARS adaptation); `lr_scale(name)`: a factor on the scheduled
    LR (layer-wise decay, DINOv2's patch-embedding multiplier). Groups in first-seen order."""
    groups: Dict[Tuple[bool, float], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        plain, scale = no_decay(name, p), lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((plain, scale), {"params": [], "weight_decay": 0.0 if plain else weight_decay,
                                               **({"lars_exclude": True} if plain else {}),
                                               **({"lr_scale": scale} if scale != 1.0 else {})})
        g["params"].append(p)
    return list(groups.values())


def vit_layer_ids(vit: nn.Module) -> Dict[str, int]:
    """Parameter name -> layer for layer-wise LR decay of a timm ViT, as DINOv2's get_vit_lr_decay_rate: 0 for
    the embeddings (patch_embed, pos_embed, class/register tokens), i + 1 for block i, depth + 1 for the rest
    (final norm, head). (timm's group_matcher puts the final norm with the last block: one layer off.)"""
    depth = len(vit.blocks)
    out = {}
    for name, _ in vit.named_parameters():
        if name.startswith("blocks."):
            out[name] = int(name.split(".")[1]) + 1
        else:
            out[name] = 0 if name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")) else depth + 1
    return out


class _ViewCount:
    """`num_views` = len(views), read on the class or on an instance (whose `views` may be its own)."""

    def __get__(self, obj, cls) -> int:
        return len((cls if obj is None else obj).views)


class Method(nn.Module):
    #: hyper-parameters (config `method.*`) with defaults; the config rejects keys not listed here
    defaults: Dict = {}
    #: the keys of `defaults` whose value may follow a schedule of the step (pretrain/schedules.py). They
    #: reach the method only through ctx[key] in its hooks, never as constructor arguments
    scheduled: Tuple[str, ...] = ()
    #: a callable (batch_size, torch.Generator) -> BoolTensor masks [M, B, N] that the data pipeline draws into
    #: batch["masks"] for every batch (iBOT's blockwise masks), or None
    masking = None
    #: the augmented views per sample the data pipeline delivers in batch["views"], each with its
    #: paper's augmentation (data.augment / data.views override them; pretrain/data/views.py)
    views: Tuple[ViewSpec, ...] = (ViewSpec(), ViewSpec())
    #: how many: len(views)
    num_views = _ViewCount()
    #: optimizer phases of one training step, in order, each with its own optimizer over
    #: `phase_module(phase)`'s parameters (a GAN: ("d", "g")). Most methods have one.
    phases = ("main",)
    #: True when the method's networks cast their inputs to their weights' dtype themselves (DDPM's
    #: UNet): DeepSpeed's bf16/fp16 backend then hands it the batch as loaded, unrounded, instead of
    #: casting it to the weights' dtype
    casts_inputs: bool = False
    #: True when W ranks at local batch B give the loss and every parameter gradient of one process at
    #: batch W*B (global BN, cross-rank gathers/sums): tests/test_rank_equivalence.py proves it for each
    cross_rank_exact: bool = False
    #: True when the method works on patch tokens and so needs a timm ViT backbone (iBOT); registry-wide tests
    #: then build it on a small ViT
    requires_vit: bool = False
    #: False when `export_backbone()` is not a timm model (a GAN's DCGAN trunk): `pretrain export` refuses it
    timm_backbone: bool = True
    #: the monitor the engine runs on data.val during training when eval.monitor=auto (pretrain/engine/trainer.py
    #: MONITORS): "knn" (kNN top-1 of `features`) or "top1" (the top-1 of a classifier's `logits(images)`: finetune)
    monitor: str = "knn"

    @classmethod
    def uses_backbone(cls, kwargs: Dict) -> bool:
        """Whether create_method builds a timm backbone for these `method.*` values (all keys present). Pixel-space
        generative models (ddpm, flow, pixelcnn, a GAN with the DCGAN discriminator) build none: they get None."""
        return True

    def __init__(self, backbone: Optional[nn.Module]):
        super().__init__()
        self.backbone = backbone
        #: key -> Schedule for each `scheduled` key: the defaults here, the config's values from create_method
        self.schedules: Dict[str, Schedule] = {k: Schedule.parse(self.defaults[k]) for k in self.scheduled}

    def step_context(self, step: int = 0, total: int = 1, steps_per_epoch: int = 1, phase: Optional[str] = None,
                **values: float) -> StepContext:
        """The StepContext of `step`: every schedule evaluated there (plus `values`, the engine's lr...)."""
        own = {k: s(step, total, steps_per_epoch) for k, s in self.schedules.items()}
        return StepContext(step, total, steps_per_epoch, phase or self.phases[0], {**own, **values})

    def forward(self, batch, ctx: Optional[StepContext] = None):
        """training_step at `ctx` (the engine always passes it; None: step 0's context, for direct calls)."""
        return self.training_step(batch, ctx or self.step_context())

    def training_step(self, batch, ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Losses for `batch` at step `ctx` (for multi-phase methods, in phase `ctx.phase`); "loss" is backpropagated."""
        raise NotImplementedError

    def phase_module(self, phase: str) -> nn.Module:
        """The module whose parameters `phase`'s optimizer updates (the whole method by default)."""
        return self

    # ---- optional hooks -------------------------------------------------------------------------
    def backbone_input_size(self, image_size: int) -> int:
        """The side of the images the backbone sees, given data.image_size (CPC: its patches)."""
        return image_size

    def param_groups(self, weight_decay: float, phase: str = "main") -> List[dict]:
        """Groups of parameters for `phase`'s optimizer. Besides torch's keys a group may carry
        `lars_exclude` (no LARS adaptation), `lr_scale` (its LR is the scheduled LR times this; Barlow
        Twins' biases), `fixed_lr` (it keeps the peak LR throughout; SimSiam's predictor) and `frozen_by` (a
        `scheduled` key: the group's LR is 0 while its value is > 0; DINO's last layer in epoch 0).

        Here: weight decay on weights; none on biases, norm parameters (any 1-D tensor) and what any
        submodule lists in its `no_weight_decay()` (timm's ViT: pos_embed, cls_token), as timm's
        param_groups_weight_decay decides. Not timm's function itself: it puts every parameter in
        its no-decay group when weight_decay is 0, and that group is also LARS's exclusion group."""
        module = self.phase_module(phase)
        skip = no_weight_decay_names(module)
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, s) for s in skip)
            (no_decay if plain else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]

    def before_step(self, ctx: StepContext) -> None:
        """Called once per optimizer step, before its first forward (also right after a resume):
        step-dependent settings that are not an input of the forward go here (SwAV's queue start)."""

    def on_gradients(self, ctx: StepContext, grads) -> None:
        """Called once per optimizer step (per phase) after the backward of its last micro-batch, before
        clipping and the optimizer step: gradient edits (DINO's last-layer freeze, per-group clipping).
        `grads` (engine/backends.py `Gradients`) reads and writes full fp32 gradients under any backend."""

    def after_step(self, ctx: StepContext) -> None:
        """Called once per optimizer step (not per micro-batch), after it: EMA/momentum updates go here."""

    def extra_state(self) -> dict:
        """Non-parameter state to checkpoint (queues, pointers); tensors and plain Python only. Here: the
        state of every EMA the method keeps as an attribute (fp32 masters; a collective under ZeRO-3, as
        the engine calls it on every rank). Overrides add to super().extra_state()."""
        emas = self._emas()
        return {"ema": {name: ema.state_dict() for name, ema in emas.items()}} if emas else {}

    def load_extra_state(self, state: dict) -> None:
        """Restore extra_state() after the weights were loaded (EMAs: their masters, or restart them from
        the loaded targets when the checkpoint has none). Overrides call super().load_extra_state(state)."""
        for name, ema in self._emas().items():
            ema.load_state_dict(state.get("ema", {}).get(name))

    def _emas(self) -> Dict[str, EMA]:
        return {name: v for name, v in vars(self).items() if isinstance(v, EMA)}

    def export_backbone(self, which: str = "default") -> nn.Module:
        """The backbone `pretrain export --which` writes and the kNN monitor (eval.which) evaluates; "default":
        the one the method's paper reports."""
        if self.backbone is None:
            raise ValueError(f"{type(self).__name__} trains no backbone to export; draw images with `pretrain sample`")
        if which != "default":
            raise ValueError(f"{type(self).__name__} has one backbone; --which {which!r} is not available")
        return self.backbone

    @torch.no_grad()
    def features(self, images: torch.Tensor, which: str = "default") -> torch.Tensor:
        """Features for evaluation (the kNN monitor, eval.which) from backbone `which` of export_backbone
        ("default": the one the method's paper reports, e.g. DINO's teacher): [B, 3, H, W] -> [B, D]."""
        return self.export_backbone(which)(images)
