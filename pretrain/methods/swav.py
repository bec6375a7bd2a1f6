"""SwAV (Caron et al. 2020): online clustering with swapped assignments between multi-crop views.

Per step, for B local samples with 2 global crops (data.image_size) and n local crops (local_crop_size):

    z_v = normalize(projector(backbone(crop_v)))          [V*B, D]   backbone once per crop size,
                                                                     the projector once over all crops
    C   = normalize(prototypes.weight, rows)              [K, D]
    p_v = z_v C^T                                         [B, K] per crop
    q_i = Sinkhorn(p_i)  for the global crops i = 0, 1    [B, K]     no gradient; sums over the global batch
    loss = mean_i mean_{v != i} mean_b  -sum_k q_i log softmax(p_v / T)

Sinkhorn-Knopp (`sinkhorn`): 3 iterations at epsilon 0.05 of alternating prototype (row) and sample
(column) normalisation of exp(p / eps). The total and the per-prototype sums run over the samples of
every rank (all-reduced), with B the global batch, as the official `distributed_sinkhorn`; each sample's
own normalisation needs only its rank. A per-rank Sinkhorn would equipartition each rank's batch alone.

Checked against facebookresearch/swav (main_swav.py, src/resnet50.py, src/multicropdataset.py); the
differences, all deliberate (docs/methods.md, SwAV):

* Prototype normalisation: the official code rewrites `prototypes.weight` with its row-normalised copy
  before every forward. We normalise in the forward instead (`F.normalize(weight)`, the weight-normalised
  prototypes of solo-learn): an in-place write to a parameter is lost under DeepSpeed ZeRO, whose optimizer
  writes its fp32 master partitions back over it. The function is the same; the prototypes' gradient is
  the one through the normalisation (tangential), and their weight decay is 0 (see next point).
* Prototype freeze (`freeze_prototypes_epochs`, official `freeze_prototypes_niters` = 313 iterations at
  batch 4096 = 1 epoch): while frozen, the prototypes' gradient is zero (a hook on the normalised weight;
  the parameter still takes part in the backward, so DDP's and DeepSpeed's reductions see every parameter
  every step) instead of the official `p.grad = None`, which DeepSpeed's flat gradient buffers cannot
  express. Zero gradient with zero weight decay leaves SGD, LARS and AdamW updates exactly zero, so the
  prototypes do not move at all under either backend. They are in a group of their own with weight decay
  0: with forward normalisation, weight decay only rescales the weight, which changes nothing in the
  function (official: 1e-6, undone by the per-step renormalisation). (AdamW only: the frozen steps count
  in its bias correction, so its first updates after the freeze are larger than a fresh Adam's.)
* Queue (`queue_length` > 0; official `--queue_length`, for small batches): per rank and per global crop,
  the newest local embeddings first, created at epoch `epoch_queue_starts`, filled every step, and used
  (its scores prepended to the batch's before Sinkhorn, only the batch's codes kept) once full. Its length
  is the official one: queue_length rounded down to a multiple of the global batch, divided by the ranks.
  Checkpointed with every rank's part; resumed on another number of ranks it restarts empty.
* Numerics: Sinkhorn runs in float64 on exp((p - 1) / eps): scores are cosines (<= 1), so the constant shift,
  which the first normalisation cancels exactly, keeps exp from overflowing, and float64 keeps it from
  underflowing to whole zero rows (NaN codes), down to eps ~ 0.003; a [B + L, K] matrix per rank is cheap.
  Scores, codes and log-softmax are fp32 under autocast too (apex O1 ran the official prototypes in fp16).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.comm import world_info
from pretrain.data.views import ViewSpec, multi_crop
from pretrain.losses import gather_no_grad
from pretrain.losses.sinkhorn import sinkhorn
from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, pair, positive

log = logging.getLogger("pretrain.methods")

#: SwAV's augmentation (facebookresearch/swav src/multicropdataset.py): RandomResizedCrop (aspect 3/4-4/3),
#: flip, colour distortion of strength s = 1 (ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2),
#: PIL Gaussian blur radius 0.1-2 with p 0.5, on every crop; no solarization. Global crops 14-100% of the area.
#: Our blur kernel is SimCLR's 10% of the side (23 taps at 224 px, 9 at 96: the local crops' Gaussian is cut
#: at 2 sigma for sigma = 2, where PIL's box approximation is not cut). A kernel of +-3 sigma (13 taps) at
#: every size was measured: oneDNN's depthwise convolution runs 13 taps at 224 px 2.8x slower than 23.
GLOBAL = ViewSpec(crop_scale=(0.14, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.8,
                  contrast=0.8, saturation=0.8, hue=0.2, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                  blur_kernel_frac=0.1, solarize_p=0.0)
#: local crops: 5-14% of the area, at 96 px (scripts/swav_800ep_pretrain.sh)
LOCAL = GLOBAL.replace(crop_scale=(0.05, 0.14))
NUM_GLOBAL = 2   # crops_for_assign = [0, 1]


def swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores [V, B, K] (every crop), codes [G, B, K] (crops 0..G-1) -> the mean over code crops i, other
    crops v != i and samples of the cross-entropy -sum_k q_i log softmax(p_v / T)."""
    V = scores.shape[0]
    logp = F.log_softmax(scores.float() / temperature, dim=-1)     # [V, B, K]
    loss = 0.0
    for i in range(codes.shape[0]):
        others = [v for v in range(V) if v != i]
        loss = loss - (codes[i] * logp[others]).sum(-1).mean()     # mean over V-1 crops and B samples
    return loss / codes.shape[0]


class Prototypes(nn.Linear):
    """K prototypes of dimension D: an nn.Linear(D, K) without bias (the official `prototypes`, so the
    state-dict key is the same) whose rows are L2-normalised in the forward: [N, D] -> scores [N, K].

    `frozen`: the weight still takes part in the forward and backward (DDP and DeepSpeed reduce every
    parameter every step), but its gradient is exactly zero."""

    frozen = False

    def __init__(self, dim: int, num: int):
        super().__init__(dim, num, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight.float(), dim=1)                 # [K, D]
        if self.frozen and w.requires_grad:
            w = w.view_as(w)
            w.register_hook(torch.zeros_like)
        with torch.autocast(z.device.type, enabled=False):         # fp32 scores: exp(s / 0.05) amplifies rounding
            return z.float() @ w.t()


@METHODS.register("swav")
class SwAV(Method):
    views = multi_crop(GLOBAL, LOCAL, NUM_GLOBAL, 6, 96)
    cross_rank_exact = True   # False while a queue is in use (set in __init__)
    defaults = {
        "num_prototypes": 3000,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "temperature": 0.1,
        "epsilon": 0.05,                     # Sinkhorn's entropic regularisation
        "sinkhorn_iterations": 3,
        "num_local_crops": 6,                # besides the 2 global crops at data.image_size
        "local_crop_size": 96,               # pixels
        "global_crop_scale": [0.14, 1.0],
        "local_crop_scale": [0.05, 0.14],
        "queue_length": 0,                   # 0: no queue (official: 3840 at batch 256)
        "epoch_queue_starts": 15,
        "freeze_prototypes_epochs": 1,
        "sync_bn": True,                     # global BN across ranks (official: SyncBN)
    }
    checks = {"num_prototypes": integer(1), "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "temperature": positive(), "epsilon": positive(), "sinkhorn_iterations": integer(1),
              "num_local_crops": integer(0), "local_crop_size": integer(1), "global_crop_scale": pair(0, 1),
              "local_crop_scale": pair(0, 1), "queue_length": integer(0), "epoch_queue_starts": integer(0),
              "freeze_prototypes_epochs": integer(0), "sync_bn": boolean()}

    def __init__(self, backbone: nn.Module, num_prototypes=3000, proj_hidden_dim=2048, proj_dim=128, temperature=0.1,
                 epsilon=0.05, sinkhorn_iterations=3, num_local_crops=6, local_crop_size=96,
                 global_crop_scale=(0.14, 1.0), local_crop_scale=(0.05, 0.14), queue_length=0, epoch_queue_starts=15,
                 freeze_prototypes_epochs=1, sync_bn=True):
        super().__init__(backbone)
        self.views = multi_crop(GLOBAL.replace(crop_scale=tuple(global_crop_scale)),
                                LOCAL.replace(crop_scale=tuple(local_crop_scale)), NUM_GLOBAL, num_local_crops,
                                local_crop_size)
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.queue_length, self.epoch_queue_starts = queue_length, epoch_queue_starts
        self.freeze_epochs, self.sync_bn = freeze_prototypes_epochs, sync_bn
        self.cross_rank_exact = queue_length == 0
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, 2)   # Linear-BN-ReLU-Linear
        self.prototypes = Prototypes(proj_dim, num_prototypes)
        if num_prototypes <= proj_dim:   # measured on digits: 100 prototypes in 128 dimensions collapsed at once
            log.warning("method.num_prototypes=%d is not above method.proj_dim=%d: an embedding orthogonal to every "
                        "prototype scores them all alike, a collapsed state with the loss at ln K and no gradient; "
                        "use more prototypes than dimensions (the paper: 3000 in 128)", num_prototypes, proj_dim)
        self.prototypes.frozen = freeze_prototypes_epochs > 0                              # step 0 until told
        # Not buffers (DDP would broadcast them): the step, and the queue [2, L, D] of this rank's past
        # global-crop embeddings with how many rows hold one; checkpointed through extra_state.
        self.global_step, self.epoch = 0, 0
        self.queue: Optional[torch.Tensor] = None
        self.queue_filled = 0

    # ---- schedule ------------------------------------------------------------------------------
    def before_step(self, ctx) -> None:
        """Prototypes frozen for the first freeze_prototypes_epochs x steps_per_epoch steps; the epoch for the queue."""
        self.global_step, self.epoch = ctx.step, ctx.epoch
        self.prototypes.frozen = ctx.step < self.freeze_epochs * ctx.steps_per_epoch

    def param_groups(self, weight_decay: float, phase: str = "main"):
        """super()'s groups without the prototypes, which get their own: no weight decay (it would only rescale
        a forward-normalised weight), LARS adaptation kept (the official LARC adapts them)."""
        proto = self.prototypes.weight
        groups = [{**g, "params": [p for p in g["params"] if p is not proto]}
                  for g in super().param_groups(weight_decay, phase)]
        return groups + [{"params": [proto], "weight_decay": 0.0, "lars_exclude": False}]

    # ---- forward -------------------------------------------------------------------------------
    def embed(self, groups) -> torch.Tensor:
        """batch["views"] (per crop size [V_g, B, 3, S_g, S_g]) -> L2-normalised embeddings [V, B, D], crops in
        declared order: the backbone once per size, the projector once over all crops (official resnet50.py)."""
        V, B = sum(g.shape[0] for g in groups), groups[0].shape[1]
        feats = torch.cat([self.backbone(g.flatten(0, 1)) for g in groups])                  # [V*B, F]
        return F.normalize(self.projector(feats).float(), dim=1).view(V, B, -1)             # [V, B, D]

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Codes [2, B, K] of the global crops from their scores [2, B, K] (and the queue's, once it is full),
        then this step's embeddings z [2, B, D] into the queue."""
        B = scores.shape[1]
        self._start_queue(B, z)
        if self.queue is not None and self.queue.device != z.device:
            self.queue = self.queue.to(z.device)
        out = []
        for i in range(NUM_GLOBAL):
            s = scores[i].detach()
            if self.queue is not None and self.queue_filled >= self.queue.shape[1]:
                s = torch.cat([self.prototypes(self.queue[i]), s])                      # [L + B, K]
            out.append(sinkhorn(s, self.epsilon, self.iterations)[-B:])
        if self.queue is not None:   # newest first, the oldest B drop out (official: shift by B)
            self.queue = torch.cat([z.detach().float(), self.queue[:, :-B]], 1)
            self.queue_filled = min(self.queue_filled + B, self.queue.shape[1])
        return torch.stack(out)

    def _start_queue(self, B: int, z: torch.Tensor) -> None:
        if self.queue is not None or not self.queue_length or self.epoch < self.epoch_queue_starts:
            return
        world = world_info()[1]
        length = (self.queue_length - self.queue_length % (B * world)) // world     # official rounding, per rank
        if length == 0:
            log.warning("method.queue_length=%d is below the global batch %d: no queue", self.queue_length, B * world)
            self.queue_length = 0
            return
        self.queue = torch.zeros(NUM_GLOBAL, length, z.shape[-1], device=z.device)
        self.queue_filled = 0

    def training_step(self, batch, ctx):
        z = self.embed(batch["views"])                                  # [V, B, D]
        scores = self.prototypes(z)                                     # [V, B, K]
        q = self.codes(scores[:NUM_GLOBAL], z[:NUM_GLOBAL])             # [2, B, K]
        return {"loss": swapped_prediction(scores, q, self.temperature)}

    # ---- checkpoint ----------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """The step, and the queue of every rank [W, 2, L, D] (a collective: every rank calls it)."""
        state = {**super().extra_state(), "step": self.global_step}
        if self.queue is not None:
            state.update(queue=gather_no_grad(self.queue[None]).cpu(), queue_filled=self.queue_filled)
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.global_step = int(state.get("step", 0))
        queue = state.get("queue")
        if queue is None:
            return
        rank, world = world_info()
        if queue.shape[0] != world:
            log.warning("the checkpoint's SwAV queue is from %d rank(s) and this run has %d: it restarts empty",
                        queue.shape[0], world)
            return
        self.queue, self.queue_filled = queue[rank].clone(), int(state["queue_filled"])
