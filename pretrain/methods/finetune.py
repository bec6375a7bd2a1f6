"""Full fine-tuning of a pretrained backbone on labelled data, as MAE's recipe (He et al. 2022,
facebookresearch/mae main_finetune.py, util/lr_decay.py), run by the same engine as pretraining.

Per step, on one augmented view x [B, 3, S, S] with labels y [B]:

    x, t = Mixup/CutMix(x, y)            t [B, K] soft targets (label smoothing inside), timm.data.Mixup, per batch
    z = pool(backbone(x))                 [B, D]  global_pool=avg: mean of a ViT's final-normed patch tokens
    logits = head(z)                      [B, K]  Linear, weight ~ trunc_normal(std 2e-5), bias 0 (as MAE)
    loss = SoftTargetCrossEntropy(logits, t)      (no mixing: LabelSmoothingCrossEntropy, or plain CE at 0 smoothing)

Mixup randomness: timm's Mixup draws from numpy's global RNG and takes no generator, so each batch's draw runs
with that RNG seeded from the batch's own seed (batch["seed"]: a function of seed, epoch, rank and batch index)
and numpy's state is put back afterwards (`seeded_numpy`): the same batch mixes the same way after a resume, and
nothing else that reads numpy's RNG sees a difference.

Layer-wise LR decay (ViTs; MAE util/lr_decay.py, from BEiT/ELECTRA): with L blocks, the patch embedding,
position embedding and class/register tokens are layer 0, block i is layer i + 1, everything after the blocks
(final norm, fc_norm, the head) is layer L + 1; a parameter of layer l gets LR x layer_decay^(L + 1 - l), through
the engine's `lr_scale` group key (pretrain/methods/base.py vit_layer_ids numbers layers the same way). Other
backbones (ResNets) train every layer at the scheduled LR. No weight decay on biases, norms, pos_embed and
cls_token (Method.param_groups' rule, MAE's: 1-D parameters and timm's no_weight_decay()).

The engine's monitor for this method is `top1` (trainer.py): the classifier's top-1 on data.val, every
eval.every_epochs. `pretrain finetune` (pretrain/finetune.py) builds the run from an exported backbone.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.views import ViewSpec
from pretrain.methods.base import Method, vit_layer_ids
from pretrain.methods.registry import METHODS
from pretrain.models.vit import is_vit
from pretrain.params import choice, fraction, integer, non_negative

#: MAE's training transform (util/datasets.py build_transform -> timm create_transform): RandomResizedCrop
#: scale 0.08-1, aspect 3/4-4/3, horizontal flip; no colour jitter (off when RandAugment is on). RandAugment
#: (rand-m9-mstd0.5-inc1) and random erasing (0.25) have no ViewSpec equivalent: see docs/finetune.md.
VIEW = ViewSpec(crop_scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
#: mixed into every batch seed before it seeds numpy for Mixup, so the stream differs from the batch's torch draws
_MIX_STREAM = 0x6D6978


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """Inside the block numpy's global RNG is a fresh MT19937 seeded from (`seed`, a fixed stream id); numpy's
    previous state is restored on exit. For library code that draws from np.random and takes no generator."""
    saved = np.random.get_state()
    np.random.set_state(np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed, _MIX_STREAM]))).get_state())
    try:
        yield
    finally:
        np.random.set_state(saved)


def odd_batch_error(batch: int) -> str:
    """The one-line error for a per-rank batch that Mixup/CutMix cannot pair (it mixes sample i with B-1-i)."""
    return (f"mixup/cutmix need an even per-rank batch, got {batch}: make train.global_batch_size / (ranks x "
            f"train.grad_accum) even, or turn mixing off with method.mixup_alpha=0 method.cutmix_alpha=0")


@METHODS.register("finetune")
class Finetune(Method):
    views = (VIEW,)
    defaults = {
        "num_classes": 1000,          # `pretrain finetune` reads it from the train shards' index.json when unset
        "layer_decay": 0.75,          # main_finetune.py's default (FINETUNE.md's ViT-B recipe: 0.65)
        "global_pool": "avg",         # avg: mean of a ViT's patch tokens (MAE's --global_pool); backbone: its own
        "label_smoothing": 0.1,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mixup_prob": 1.0,            # probability of mixing a batch at all
        "mixup_switch_prob": 0.5,     # probability of CutMix rather than Mixup when both are on
        "mixup_mode": "batch",        # timm's: one lambda per batch (MAE), per pair or per element
    }
    checks = {"num_classes": integer(2), "layer_decay": fraction(lo_open=True), "global_pool": choice("avg", "backbone"),
              "label_smoothing": fraction(hi_open=True), "mixup_alpha": non_negative(), "cutmix_alpha": non_negative(),
              "mixup_prob": fraction(what="a probability"), "mixup_switch_prob": fraction(what="a probability"),
              "mixup_mode": choice("batch", "pair", "elem")}
    #: the engine's monitor: top-1 of `logits` on data.val (pretrain/engine/trainer.py)
    monitor = "top1"

    def __init__(self, backbone: nn.Module, num_classes=1000, layer_decay=0.75, global_pool="avg", label_smoothing=0.1,
                 mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch"):
        from timm.data import Mixup
        from timm.layers import trunc_normal_

        super().__init__(backbone)
        self.num_classes, self.layer_decay, self.global_pool = num_classes, layer_decay, global_pool
        self.label_smoothing = label_smoothing
        self.head = nn.Linear(backbone.num_features, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)   # main_finetune.py: "manually initialize fc layer"
        nn.init.zeros_(self.head.bias)
        self.mixup = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    # ---- optimizer ------------------------------------------------------------------------------------
    def lr_scales(self) -> Dict[str, float]:
        """Parameter name -> LR factor: layer_decay^(L + 1 - layer) for a ViT backbone's parameters (MAE's
        param_groups_lrd), 1 for everything else (the head; any backbone that is not a ViT)."""
        if self.layer_decay == 1.0 or not is_vit(self.backbone):
            return {}
        layers = vit_layer_ids(self.backbone)
        top = len(self.backbone.blocks) + 1
        return {f"backbone.{n}": self.layer_decay ** (top - layer) for n, layer in layers.items()}

    def param_groups(self, weight_decay: float, phase: str = "main") -> List[dict]:
        """Method.param_groups' weight-decay split, each part split again by LR factor (`lr_scale`)."""
        scales = self.lr_scales()
        scale = {id(p): scales.get(n, 1.0) for n, p in self.named_parameters()}
        out = []
        for group in super().param_groups(weight_decay, phase):
            by_scale: Dict[float, list] = {}
            for p in group["params"]:
                by_scale.setdefault(scale[id(p)], []).append(p)
            out += [{**group, "params": ps, **({"lr_scale": s} if s != 1.0 else {})} for s, ps in by_scale.items()]
        return out

    # ---- forward -----------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the pooled features [B, D] the head reads. global_pool=avg on a timm ViT built with
        another pooling: timm's own avg pool of the final-normed tokens (prefix tokens left out), then its
        fc_norm and head dropout, as its forward_head would with global_pool='avg'. Otherwise the backbone's output."""
        b = self.backbone
        if self.global_pool == "avg" and is_vit(b) and b.global_pool != "avg":
            return b.head_drop(b.fc_norm(b.pool(b.forward_features(images), pool_type="avg")))
        return b(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> class logits [B, num_classes] (the engine's top-1 monitor calls this)."""
        return self.head(self.embed(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor, which: str = "default") -> torch.Tensor:
        """The classifier's input features [B, D] (for eval.monitor=knn)."""
        self.export_backbone(which)   # one backbone: refuses any other `which`
        return self.embed(images)

    def check_labels(self, labels: torch.Tensor) -> None:
        """One-line errors for labels the head cannot take: none (-1: a sample without .cls) or >= num_classes."""
        if not ((labels < 0) | (labels >= self.num_classes)).any():   # one host sync per micro-batch
            return
        from pretrain.config import ConfigError
        from pretrain.data import DataError

        if labels.min() < 0:
            raise DataError("the training shards have samples without a .cls label; fine-tuning needs labelled shards "
                            "(`pretrain shards` writes them from a folder of class subfolders)")
        top = int(labels.max())
        raise ConfigError(f"a training label is {top} but method.num_classes={self.num_classes}; "
                          f"set method.num_classes={top + 1} or more")

    def mixing_seed(self, batch) -> int:
        """The batch's seed (from the data pipeline); a hand-made batch without one draws it from torch's RNG."""
        seed = batch.get("seed")
        return int(seed) if seed is not None else int(torch.randint(2 ** 62, ()))

    def training_step(self, batch, ctx) -> Dict[str, torch.Tensor]:
        x, y = batch["views"][0][0], batch["label"]            # [B, 3, S, S], [B]
        self.check_labels(y)
        if self.mixup is None:
            logits = self.logits(x).float()                   # [B, K]
            if self.label_smoothing > 0:
                from timm.loss import LabelSmoothingCrossEntropy

                return {"loss": LabelSmoothingCrossEntropy(self.label_smoothing)(logits, y)}
            return {"loss": F.cross_entropy(logits, y)}
        from timm.loss import SoftTargetCrossEntropy

        if len(x) % 2:
            from pretrain.config import ConfigError

            raise ConfigError(odd_batch_error(len(x)))
        with seeded_numpy(self.mixing_seed(batch)):
            x, targets = self.mixup(x.clone(), y)               # mixes in place: the batch itself stays as loaded
        return {"loss": SoftTargetCrossEntropy()(self.logits(x).float(), targets.float())}   # targets [B, K]
