"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder, a queue of K negative keys,
and shuffle-BN.

Per step, for B local samples with views v1 (queries) and v2 (keys):
    q = normalize(projector(backbone(v1)))                         [B, D]   with gradients
    k = normalize(key_projector(key_backbone(shuffled v2)))        [B, D]   no gradients
    loss = CE([q.k | q.queue] / T, positive at 0)                   queue: [K, D]
then the keys of all ranks enter the queue (the same on every rank), and after the optimizer step
the key encoder moves towards the query encoder (MomentumMethod).

Shuffle-BN: BatchNorm statistics would let a query find its key through the batch they share, so the
key batch is shuffled across ranks before the key encoder and unshuffled after. In one process
there is nothing to shuffle across; split-BN instead runs both encoders on `split_bn_groups`
sub-batches (the keys' sub-batches drawn at random), so each BN sees a different set of samples.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.views import ViewSpec
from pretrain.comm import world_info
from pretrain.losses import queue_info_nce, gather_no_grad, shuffle_across_ranks, unshuffle_across_ranks
from pretrain.methods.momentum import MomentumMethod
from pretrain.methods.registry import METHODS
from pretrain.models import mlp_head
from pretrain.params import boolean, integer, positive


def _split(fn, x: torch.Tensor, groups: int) -> torch.Tensor:
    """fn over `groups` sub-batches of x (each its own BN statistics), concatenated. At least 2
    samples per sub-batch: BN cannot train on one."""
    groups = min(groups, x.shape[0] // 2)
    if groups <= 1:
        return fn(x)
    return torch.cat([fn(c) for c in x.tensor_split(groups)], 0)


#: MoCo v2's augmentation (Chen et al. 2020, "aug+"; facebookresearch/moco main_moco.py --aug-plus): crop
#: 20-100% of the area, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur sigma 0.1-2
#: with p 0.5, flip; both views alike.
VIEW = ViewSpec(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                blur_kernel_frac=0.1, solarize_p=0.0)


@METHODS.register("moco_v2")
class MoCoV2(MomentumMethod):
    views = (VIEW, VIEW)
    defaults = {
        "temperature": 0.2,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "proj_layers": 2,
        "proj_bn": False,                  # BN in the projector's hidden layers (the official head has none)
        "queue_size": 65536,
        "momentum": 0.999,                 # or a schedule, e.g. {shape: cosine, start: 0.99, end: 1.0}
        "shuffle_bn": True,                # across ranks; in one process, split-BN instead
        "split_bn_groups": 8,              # one process only: sub-batches for split-BN
    }
    checks = {**MomentumMethod.checks, "temperature": positive(), "proj_hidden_dim": integer(1), "proj_dim": integer(1),
              "proj_layers": integer(1), "proj_bn": boolean(), "queue_size": integer(1), "shuffle_bn": boolean(),
              "split_bn_groups": integer(1)}   # any queue size works, a multiple of the global batch or not

    def __init__(self, backbone: nn.Module, temperature=0.2, proj_hidden_dim=2048, proj_dim=128, proj_layers=2,
                 proj_bn=False, queue_size=65536, shuffle_bn=True,
                 split_bn_groups=8):
        super().__init__(backbone)
        self.temperature, self.shuffle_bn, self.split_bn_groups = temperature, shuffle_bn, split_bn_groups
        # official MoCo v2 head: fc -> ReLU -> fc (biases, no BN); proj_bn=true: SimCLR's head with BN
        self.projector = mlp_head(backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, bn=proj_bn)
        self.init_momentum_encoder(["backbone", "projector"])
        # The queue is not a buffer: DDP would broadcast all K keys every step. It lives on the keys'
        # device and is checkpointed through extra_state. Random unit vectors to start, as MoCo;
        # a fixed generator makes it identical on every rank.
        g = torch.Generator().manual_seed(0)
        self.queue = F.normalize(torch.randn(queue_size, proj_dim, generator=g), dim=1)   # [K, D]
        self.queue_ptr = 0

    def _query(self, x):
        return self.projector(self.backbone(x))

    def _key(self, x):
        return self.key_projector(self.key_backbone(x))

    def _groups(self) -> int:
        return self.split_bn_groups if self.shuffle_bn and world_info()[1] == 1 else 1

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key-encoder outputs [B, D] for this rank's samples x [B, 3, H, W], in x's order, with
        shuffle-BN across ranks (or split-BN in one process) when shuffle_bn is on."""
        if not self.shuffle_bn:
            return self._key(x)
        xs, perm = shuffle_across_ranks(x)                    # B samples drawn from the global batch
        return unshuffle_across_ranks(_split(self._key, xs, self._groups()), perm)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Put the keys of all ranks [W*B, D] into the queue at the pointer, wrapping around; the
        same keys in the same order on every rank, so every rank's queue stays identical."""
        keys = gather_no_grad(k).float()
        K = self.queue.shape[0]
        if keys.shape[0] > K:                                 # more keys than slots: keep the newest
            keys = keys[-K:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % K
        self.queue = self.queue.index_copy(0, idx, keys)     # out of place: this step's loss saved the old one
        self.queue_ptr = int((self.queue_ptr + keys.shape[0]) % K)

    def training_step(self, batch, ctx):
        v1, v2 = batch["views"][0]                            # each [B, 3, H, W]
        if self.queue.device != v1.device:
            self.queue = self.queue.to(v1.device)
        q = F.normalize(_split(self._query, v1, self._groups()).float(), dim=1)   # [B, D]
        k = F.normalize(self.keys(v2).float(), dim=1)                           # [B, D]
        loss = queue_info_nce(q, k, self.queue, self.temperature)
        self.enqueue(k)
        return {"loss": loss}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "queue": self.queue.detach().cpu().clone(), "queue_ptr": self.queue_ptr}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "queue" in state:
            if state["queue"].shape != self.queue.shape:
                raise ValueError(f"the checkpoint's queue is {tuple(state['queue'].shape)} but method.queue_size/proj_dim "
                                 f"give {tuple(self.queue.shape)}; resume with the run's own settings")
            self.queue = state["queue"].to(self.queue.device, self.queue.dtype)
            self.queue_ptr = int(state["queue_ptr"])
