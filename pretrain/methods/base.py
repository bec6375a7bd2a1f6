"""The method interface every pretraining method implements.

A method is an nn.Module that owns a backbone plus whatever heads it needs, and returns a dict of
losses from `training_step(batch)`; the engine backpropagates `losses["loss"]` and logs the rest.
`forward` is `training_step`, so DDP and DeepSpeed wrappers see the whole method.

batch["views"] holds the views the method declares (`views`), one tensor per view size, in declared
order: [V_g, B, 3, S_g, S_g] each (pretrain/data/views.py). A two-view method of one size unpacks
`v1, v2 = batch["views"][0]`; a multi-crop method runs its backbone once per tensor.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Set, Tuple

import torch
import torch.nn as nn

from pretrain.data.views import ViewSpec
from pretrain.models.ema import EMA


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


class _ViewCount:
    """`num_views` = len(views), read on the class or on an instance (whose `views` may be its own)."""

    def __get__(self, obj, cls) -> int:
        return len((cls if obj is None else obj).views)


class Method(nn.Module):
    #: hyper-parameters (config `method.*`) with defaults; the config rejects keys not listed here
    defaults: Dict = {}
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
    #: False when `export_backbone()` is not a timm model (a GAN's DCGAN trunk): `pretrain export` refuses it
    timm_backbone: bool = True

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch, phase: str = "main"):
        return self.training_step(batch) if phase == "main" else self.training_step(batch, phase)

    def training_step(self, batch, phase: str = "main") -> Dict[str, torch.Tensor]:
        """Losses for `batch` (and, for multi-phase methods, `phase`); "loss" is backpropagated."""
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
        Twins' biases) and `fixed_lr` (it keeps the peak LR throughout; SimSiam's predictor).

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

    def before_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called once per optimizer step, before its first forward (also right after a resume):
        step-dependent settings go here (SwAV's prototype freeze, its queue's start)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called once per optimizer step (not per micro-batch): EMA/momentum updates go here."""

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
        """The backbone `pretrain export` writes."""
        if self.backbone is None:
            raise ValueError(f"{type(self).__name__} trains no backbone to export; draw images with `pretrain sample`")
        if which != "default":
            raise ValueError(f"{type(self).__name__} has one backbone; --which {which!r} is not available")
        return self.backbone

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features for evaluation: [B, 3, H, W] -> [B, D]."""
        return self.export_backbone()(images)
