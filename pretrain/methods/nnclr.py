"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends"): the positive of each sample is not its
other view but the nearest neighbour of its embedding in a support set of earlier embeddings.

For two views x1, x2 of B local samples (W ranks, N = W*B in the global batch):
    z_v = projector(backbone(x_v))                         [B, D]   (L2-normalised for the lookup)
    p_v = predictor(z_v)                                   [B, D]   with gradients
    nn_v = NN(z_v, Q) = argmax_{q in Q} cos(z_v, q)        [B, D]   from the support set Q [K, D], no gradient
    loss = 1/4 [ ctr(nn1, p2) + ctr(nn2, p1) + ctr(p2, nn1) + ctr(p1, nn2) ],
    ctr(a, b) = InfoNCE with a_i as the anchor, b_i its positive and b_k (k != i, all N samples) negatives.
ctr(nn1, p2) is the paper's eq. 2 (its p_i^+ = g(z_i^+), section 3.2); ctr(p2, nn1) is its symmetrising term,
the same similarity matrix normalised over the neighbours NN(z_k) instead of the predictions (the transposed
terms of VISSL's nnclr_loss and of the Keras example); the view-swapped pair symmetrises the views, as
solo-learn and lightly do. There is no official code; solo-learn and lightly keep only the swapped pair.

The support set is a ring buffer of the view-1 embeddings z1 of the whole global batch (gathered from all
ranks, in rank order, so it is the same on every rank), filled after each optimizer step with every
micro-batch of that step: the lookups of a step all see the support set as it was when the step began, as
one process with the whole batch would. It starts as random unit vectors (as solo-learn, lightly and the
Keras example). They only serve the first steps: real embeddings, once in, are nearer than random directions
(on the digits, every lookup of step 0, some of step 1's and none from step 2 on went to a random entry;
tests/test_nnclr.py). Starting from an empty set instead would need a special case for step 0, which has
nothing to look up, for no measurable gain. Checkpointed through extra_state.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.losses import gather_no_grad, info_nce
from pretrain.methods.base import Method
from pretrain.methods.byol import VIEW_1, VIEW_2   # BYOL's asymmetric pair, the paper's augmentation (section 4)
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, positive


@METHODS.register("nnclr")
class NNCLR(Method):
    views = (VIEW_1, VIEW_2)
    defaults = {
        "temperature": 0.1,
        "proj_hidden_dim": 2048,
        "proj_dim": 256,
        "proj_layers": 3,          # Linear-BN-ReLU x2 -> Linear -> BN
        "pred_hidden_dim": 4096,   # Linear-BN-ReLU -> Linear
        "queue_size": 98304,       # the support set
        "sync_bn": True,           # BN statistics over the global batch (the paper's TPU cross-replica BN)
    }
    checks = {"temperature": positive(), "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "proj_layers": integer(1), "pred_hidden_dim": integer(1), "queue_size": integer(1),
              "sync_bn": boolean()}

    def __init__(self, backbone: nn.Module, temperature=0.1, proj_hidden_dim=2048, proj_dim=256, proj_layers=3,
                 pred_hidden_dim=4096, queue_size=98304, sync_bn=True):
        super().__init__(backbone)
        self.temperature, self.sync_bn = temperature, sync_bn
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bn=True)
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, 2)
        # Not a buffer (DDP would broadcast it every step); a fixed generator makes it the same on every rank.
        g = torch.Generator().manual_seed(0)
        self.support = F.normalize(torch.randn(queue_size, proj_dim, generator=g), dim=1)   # [K, D]
        self.support_ptr = 0
        self._pending: List[torch.Tensor] = []   # this step's gathered z1, [N, D] per micro-batch

    @torch.no_grad()
    def nearest_neighbours(self, z: torch.Tensor):
        """(NN(z, Q) [B, D], their rows in the support set [B]): the entry of largest cosine with each z
        [B, D], i.e. the smallest Euclidean distance between unit vectors (the paper's argmin)."""
        idx = (F.normalize(z.float(), dim=1) @ self.support.t()).argmax(1)               # [B]
        return self.support[idx], idx

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Write z [n, D] (unit vectors, the same on every rank) into the support set at the pointer,
        wrapping around; when n > K only the newest K are kept."""
        K, n = self.support.shape[0], z.shape[0]
        idx = ((self.support_ptr + torch.arange(n, device=self.support.device)) % K)[-K:]   # as if one at a time
        z = z[-K:].to(self.support.device, self.support.dtype)
        self.support = self.support.index_copy(0, idx, z)   # out of place: a saved graph may hold the old one
        self.support_ptr = int((self.support_ptr + n) % K)

    def _ctr(self, a, b, grad_through_keys):
        return info_nce(a, b, self.temperature, grad_through_keys=grad_through_keys)

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                                         # each [B, 3, H, W]
        if self.support.device != v1.device:
            self.support = self.support.to(v1.device)
        # one forward per view: BN statistics per view, as BYOL / MoCo v3 (the paper builds on BYOL's code)
        z1, z2 = (self.projector(self.backbone(v)) for v in (v1, v2))     # [B, D] each
        p1, p2 = self.predictor(z1), self.predictor(z2)                    # [B, D] each
        (nn1, _), (nn2, _) = self.nearest_neighbours(z1), self.nearest_neighbours(z2)
        # anchors are this rank's rows; keys are gathered from every rank (predictions with gradients)
        loss = (self._ctr(nn1, p2, True) + self._ctr(nn2, p1, True)
                + self._ctr(p2, nn1, False) + self._ctr(p1, nn2, False)) / 4
        if self.training:
            self._pending.append(gather_no_grad(F.normalize(z1.detach().float(), dim=1)))   # [N, D]
        return {"loss": loss}

    def after_step(self, ctx) -> None:
        """Once per optimizer step: this step's view-1 embeddings, every micro-batch, enter the support set."""
        if self._pending:
            self.enqueue(torch.cat(self._pending))
            self._pending = []

    def extra_state(self) -> dict:
        return {**super().extra_state(), "support": self.support.detach().cpu().clone(),
                "support_ptr": self.support_ptr}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "support" in state:
            if state["support"].shape != self.support.shape:
                raise ValueError(f"the checkpoint's support set is {tuple(state['support'].shape)} but "
                                 f"method.queue_size/proj_dim give {tuple(self.support.shape)}; resume with the "
                                 f"run's own settings")
            self.support = state["support"].to(self.support.device, self.support.dtype)
            self.support_ptr = int(state["support_ptr"])
        self._pending = []
