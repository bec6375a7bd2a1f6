"""DINO (Caron et al. 2021): self-distillation with no labels. A student network matches the output
distribution of a momentum teacher (an EMA of the student) across multi-crop views.

Per step, for B local samples with 2 global crops (data.image_size) and n local crops (local_crop_size):

    s_v = head(backbone(crop_v))                       [V, B, K]  student, every crop (backbone once per size)
    t_i = key_head(key_backbone(crop_i)), i = 0, 1     [2, B, K]  teacher (EMA), global crops only, no gradient
    p_i = softmax((t_i - c) / tau_t)                   centering, or Sinkhorn-Knopp (DINOv2) with `centering`
    loss = mean over pairs (i, v != i) of mean_b -sum_k p_i log softmax(s_v / tau_s)
    c <- m_c c + (1 - m_c) mean over all ranks of t   after the loss (center_momentum 0.9)

Everything that can overflow (the softmaxes, the centre, the weight-normalised last layer, KoLeo) runs in
float32 whatever the engine's dtype (pretrain/losses/dino.py). Schedules (pretrain/schedules.py, per step,
so resume is exact): teacher_temp (0.04 -> 0.07 over 30 epochs), momentum (cosine 0.996 -> 1), the weight
decay (optim.weight_decay, cosine 0.04 -> 0.4 in the configs), freeze_last_layer (1 in epoch 0: the last
layer's parameter group has LR 0, `frozen_by`, as DINOv2 does; DINO sets its gradient to None, which
DeepSpeed's flat buffers cannot express; zeroing it instead would feed AdamW zeros, so its moments would decay
while its step count runs and its first updates after the freeze would be ~3x too large. With LR 0 the moments
follow the true gradients: docs/methods.md, DINO, says how that differs from DINO's fresh state). DINO clips each parameter's gradient norm to
`clip_grad` (utils.clip_gradients) in `on_gradients`; train.clip_grad (a global norm) stays 0.

DINOv2-style options: `centering: sinkhorn`, `koleo_weight` (KoLeo on the student's global-crop features,
nearest neighbours over the global batch), `layer_decay` and `patch_embed_lr_mult` (parameter groups).
iBOT (ibot.py) extends this class with masked patch tokens.

Checked against facebookresearch/dino (main_dino.py, vision_transformer.py DINOHead, utils.py); deviations in
docs/methods.md (DINO).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from pretrain.losses.dino import dino_loss, koleo_loss, sinkhorn_teacher, teacher_probs, update_center
from pretrain.methods.base import rule_groups, vit_layer_ids
from pretrain.methods.byol import VIEW_1, VIEW_2
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models import DINOHead
from pretrain.params import boolean, choice, fraction, integer, non_negative, pair, positive

#: main_dino.py DataAugmentationDINO: flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; global crop 1
#: blur p 1.0, global crop 2 blur p 0.1 + solarize 0.2 (BYOL's pair), local crops blur p 0.5; sigma 0.1-2.
GLOBAL_1, GLOBAL_2 = VIEW_1.replace(crop_scale=(0.4, 1.0)), VIEW_2.replace(crop_scale=(0.4, 1.0))
LOCAL = VIEW_1.replace(crop_scale=(0.05, 0.4), blur_p=0.5)


def dino_views(global_scale, local_scale, num_local: int, local_size: int):
    """2 global crops (data.image_size) then `num_local` local crops of side `local_size`."""
    g = (GLOBAL_1.replace(crop_scale=tuple(global_scale)), GLOBAL_2.replace(crop_scale=tuple(global_scale)))
    return g + (LOCAL.replace(crop_scale=tuple(local_scale), size=local_size),) * num_local


def no_drop_path(module: nn.Module) -> nn.Module:
    """The teacher runs without stochastic depth (official: built with drop_path_rate 0)."""
    for m in module.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return module


@METHODS.register("dino")
class DINO(MomentumMethod):
    views = dino_views((0.4, 1.0), (0.05, 0.4), 8, 96)
    defaults = {
        "out_dim": 65536,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "head_layers": 3,
        "norm_last_layer": True,
        "head_bn": False,
        "student_temp": 0.1,
        "teacher_temp": {"shape": "linear", "start": 0.04, "end": 0.07, "epochs": 30},
        "center_momentum": 0.9,
        "centering": "center",          # center (DINO) | sinkhorn (DINOv2's Sinkhorn-Knopp, 3 iterations)
        "momentum": {"shape": "cosine", "start": 0.996, "end": 1.0},
        "freeze_last_layer": {"shape": "step", "start": 1, "end": 0, "epochs": 1},   # > 0: last layer frozen
        "clip_grad": 3.0,               # per-parameter gradient-norm clip (utils.clip_gradients); 0 = off
        "koleo_weight": 0.0,            # DINOv2: 0.1
        "layer_decay": 1.0,             # layer-wise LR decay over the backbone's blocks (DINOv2 ViT-g: 0.9)
        "patch_embed_lr_mult": 1.0,     # DINOv2: 0.2
        "num_local_crops": 8,
        "local_crop_size": 96,
        "global_crop_scale": [0.4, 1.0],
        "local_crop_scale": [0.05, 0.4],
    }
    checks = {**MomentumMethod.checks, "out_dim": integer(1), "hidden_dim": integer(1), "bottleneck_dim": integer(1),
              "head_layers": integer(1), "norm_last_layer": boolean(), "head_bn": boolean(), "student_temp": positive(),
              "teacher_temp": positive(), "center_momentum": fraction(), "centering": choice("center", "sinkhorn"),
              "freeze_last_layer": non_negative(), "clip_grad": non_negative(), "koleo_weight": non_negative(),
              "layer_decay": fraction(lo_open=True), "patch_embed_lr_mult": non_negative(),
              "num_local_crops": integer(0), "local_crop_size": integer(1), "global_crop_scale": pair(0, 1),
              "local_crop_scale": pair(0, 1)}
    scheduled = ("momentum", "teacher_temp", "freeze_last_layer")
    #: the centre and Sinkhorn sums run over every rank, the loss is a per-sample mean, KoLeo gathers: W ranks x B
    #: equal one process at W*B (tests/test_rank_equivalence.py)
    cross_rank_exact = True

    def __init__(self, backbone: nn.Module, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3,
                 norm_last_layer=True, head_bn=False, student_temp=0.1, center_momentum=0.9, centering="center",
                 clip_grad=3.0, koleo_weight=0.0, layer_decay=1.0, patch_embed_lr_mult=1.0, num_local_crops=8,
                 local_crop_size=96, global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4)):
        super().__init__(backbone)
        self.views = dino_views(global_crop_scale, local_crop_scale, num_local_crops, local_crop_size)
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.clip_grad, self.koleo_weight = clip_grad, koleo_weight
        self.sync_bn = True   # a backbone with BatchNorm (ResNet) gets global BN, as main_dino.py's SyncBatchNorm
        self.layer_decay, self.patch_embed_lr_mult = layer_decay, patch_embed_lr_mult
        self.head = DINOHead(backbone.num_features, out_dim, hidden_dim, bottleneck_dim, head_layers,
                             norm_last_layer, head_bn)
        self.init_momentum_encoder(["backbone", "head"])   # key_backbone, key_head: the teacher
        no_drop_path(self.key_backbone)
        # [1, K] float32 on every rank alike (all-reduced); not a buffer: DeepSpeed's bf16/fp16 would cast it
        self.center: Optional[torch.Tensor] = None

    # ---- parameter groups and gradient edits -------------------------------------------------------
    def param_groups(self, weight_decay: float, phase: str = "main") -> List[dict]:
        """DINO's rule (utils.get_params_groups): no weight decay on biases and 1-D parameters only (the
        position embedding and class token are decayed); with layer_decay < 1 each backbone parameter's LR is
        scaled by layer_decay^(depth - its layer), and patch_embed.* by patch_embed_lr_mult (DINOv2)."""
        layers = vit_layer_ids(self.backbone) if self.layer_decay != 1.0 else {}
        depth = max(layers.values(), default=0)

        def lr_scale(name: str) -> float:
            if name == "mask_token":   # iBOT's: with the embeddings, as DINOv2
                return self.layer_decay ** depth if layers else 1.0
            if not name.startswith("backbone."):
                return 1.0
            inner = name[len("backbone."):]
            scale = self.layer_decay ** (depth - layers.get(inner, depth)) if layers else 1.0
            return scale * (self.patch_embed_lr_mult if inner.startswith("patch_embed.") else 1.0)

        groups = rule_groups(self, weight_decay, lambda name, p: p.ndim <= 1 or name.endswith(".bias"), lr_scale)
        last = {id(p) for h in self.last_layers() for p in h.last_layer_params()}
        frozen = [{**g, "params": [p for p in g["params"] if id(p) in last], "frozen_by": "freeze_last_layer"}
                  for g in groups]
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in last]} for g in groups]
        return [g for g in rest + frozen if g["params"]]

    def last_layers(self) -> List[nn.Module]:
        """The heads whose last layer is frozen early on (iBOT's separate patch head too)."""
        return [self.head]

    def before_step(self, ctx) -> None:
        freeze = self.schedules["freeze_last_layer"]
        if freeze.shape == "constant" and freeze.start > 0:   # main_dino.py's `--freeze_last_layer 1` means 1 epoch
            from pretrain.config import ConfigError

            raise ConfigError(f"method.freeze_last_layer={freeze.start:g} would freeze the last layer for the whole run; "
                              f"for N epochs write {{shape: step, start: 1, end: 0, epochs: N}} (0: no freeze)")

    def on_gradients(self, ctx, grads) -> None:
        """Each parameter's gradient norm clipped to clip_grad (DINO's utils.clip_gradients)."""
        if self.clip_grad > 0:
            for p in self.parameters():
                if not p.requires_grad:
                    continue
                g = grads.get(p)
                if g is None:
                    continue
                norm = g.float().norm()
                if norm > self.clip_grad:
                    grads.set(p, g * (self.clip_grad / (norm + 1e-6)))

    # ---- forward -------------------------------------------------------------------------------------
    def student(self, groups):
        """Student logits [V, B, K] of every crop (the backbone once per crop size, the head once) and the
        backbone features [V*B, F]."""
        V, B = sum(g.shape[0] for g in groups), groups[0].shape[1]
        feats = torch.cat([self.backbone(g.flatten(0, 1)) for g in groups])           # [V*B, F]
        return self.head(feats).view(V, B, -1), feats

    @torch.no_grad()
    def teacher(self, global_crops: torch.Tensor) -> torch.Tensor:
        """[2, B, K] teacher logits of the global crops [2, B, 3, S, S]."""
        G, B = global_crops.shape[:2]
        return self.key_head(self.key_backbone(global_crops.flatten(0, 1))).view(G, B, -1)

    def targets(self, t: torch.Tensor, temp: float, center_name: str = "center") -> torch.Tensor:
        """Teacher probabilities [..., K] from its logits, then the centre update (after its use, as official)."""
        if self.centering == "sinkhorn":
            return sinkhorn_teacher(t.flatten(0, -3) if t.dim() > 3 else t, temp).view(t.shape)
        center = getattr(self, center_name)
        if center is None or center.device != t.device:
            shape = (1,) * (t.dim() - 1) + (t.shape[-1],)
            center = torch.zeros(shape, device=t.device) if center is None else center.to(t.device)
        probs = teacher_probs(t, center, temp)
        setattr(self, center_name, update_center(center, t, self.center_momentum))
        return probs

    @staticmethod
    def koleo(feats: torch.Tensor, num_global: int, B: int) -> torch.Tensor:
        """KoLeo on the student's backbone features [V*B, F] of each global crop (DINOv2: summed over them)."""
        f = feats[:num_global * B].float().view(num_global, B, -1)
        return sum(koleo_loss(f[i]) for i in range(num_global))

    def training_step(self, batch, ctx) -> Dict[str, torch.Tensor]:
        groups = batch["views"]                        # [2, B, 3, S, S] global crops, then [n, B, 3, s, s] local
        G, B = groups[0].shape[:2]
        s, feats = self.student(groups)                                    # [V, B, K], [V*B, F]
        t = self.teacher(groups[0])                                        # [2, B, K]
        probs = self.targets(t, ctx["teacher_temp"])
        out = {"dino_loss": dino_loss(s, probs, self.student_temp)}
        if self.koleo_weight > 0:
            out["koleo"] = self.koleo(feats, G, B)
        loss = out["dino_loss"] + self.koleo_weight * out.get("koleo", 0.0)
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}

    # ---- checkpoint and export -----------------------------------------------------------------------
    def _centers(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if k.startswith("center") and torch.is_tensor(v)}

    def extra_state(self) -> dict:
        return {**super().extra_state(), **{k: v.detach().cpu().clone() for k, v in self._centers().items()}}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        for k, v in state.items():
            if k.startswith("center") and torch.is_tensor(v):
                setattr(self, k, v.clone())

    def export_backbone(self, which: str = "default"):
        """DINO reports its teacher: default/teacher (or key, as the momentum methods say) -> the EMA backbone,
        student (query) -> the trained one."""
        if which in ("default", "teacher", "key"):
            return self.key_backbone
        if which in ("student", "query"):
            return self.backbone
        raise ValueError(f"{type(self).__name__} exports --which teacher (default) or student, not {which!r}")


__all__ = ["DINO", "dino_views", "no_drop_path"]
