"""Patch masks for masked-image modelling, drawn in the loader workers.

A masking is a picklable callable `masking(batch_size, generator) -> BoolTensor [num_views, batch_size,
h*w]` (True = masked, row-major over the patch grid) that draws all its randomness from the
torch.Generator it is given, so a batch's masks are a pure function of (batch_size, generator state).
A method sets `self.masking` to one; the data pipeline adds its output as batch["masks"].

* `BlockMasking`: iBOT's blockwise masking (bytedance/ibot, loader.py ImageFolderMask, pred_shape
  'block', itself BEiT's MaskingGenerator). iBOT's recipe (`--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`)
  picks per view and image between no mask and a target ratio uniform in 0.3 +- 0.2: `prob=0.5`,
  `ratio=(0.1, 0.5)` here. Rectangles of log-uniform aspect ratio in [min_aspect, 1/min_aspect] and
  area uniform in [min_patches, patches still to mask] are added while they bring new patches without
  overshooting the target; 10 failed tries in a row end the mask, so a mask may fall short of its target
  but never exceeds it. Overlapping rectangles make L- or T-shaped regions.
* `RandomMasking`: uniform random patches, the same count for every image (MAE's rule:
  N - int(N * (1 - ratio)) of N patches), so the kept tokens of a batch stack into one tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch


class _Masking:
    def __init__(self, grid: Union[int, Sequence[int]], num_views: int):
        self.grid = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(g) for g in grid)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"masking grid must be (h, w) patches with h, w >= 1, got {grid}; use patch_grid(model, image_size)")
        if num_views < 1:
            raise ValueError(f"masking num_views must be >= 1, got {num_views}")
        self.num_views = int(num_views)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class BlockMasking(_Masking):
    """iBOT's blockwise masking (see the module docstring).

    Args:
        grid: (h, w) patches per image (`pretrain.models.vit.patch_grid`), or an int for a square grid.
        num_views: views per image that get their own mask (iBOT: the 2 global crops).
        ratio: (lo, hi): a masked image's target fraction of masked patches is uniform in [lo, hi];
            a float is a fixed target.
        prob: probability that a view of an image is masked at all (iBOT: 0.5).
        min_patches: smallest rectangle area drawn; None: iBOT's (min(h, w) // 3) ** 2 (16 at 14x14).
            BEiT and DINOv2 use 4 (DINOv2) or 16 (BEiT).
        max_patches: largest rectangle area; None: no cap (iBOT; DINOv2 uses half the patches).
        min_aspect, max_aspect: a rectangle's h / w is log-uniform in [min_aspect, max_aspect]
            (default max: 1 / min_aspect; iBOT: 0.3).
    """

    def __init__(self, grid: Union[int, Sequence[int]], num_views: int = 2, ratio: Union[float, Tuple[float, float]] = (0.1, 0.5),
                 prob: float = 0.5, min_patches: Optional[int] = None, max_patches: Optional[int] = None,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None):
        super().__init__(grid, num_views)
        lo, hi = (ratio, ratio) if isinstance(ratio, (int, float)) else tuple(ratio)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"masking ratio must be (lo, hi) with 0 <= lo <= hi <= 1, got {ratio}")
        if not 0 <= prob <= 1:
            raise ValueError(f"masking prob must be in [0, 1], got {prob}")
        max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not 0 < min_aspect <= (max_aspect or 0):
            raise ValueError(f"masking aspect ratios must satisfy 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.ratio, self.prob = (float(lo), float(hi)), float(prob)
        self.min_patches = (min(self.grid) // 3) ** 2 if min_patches is None else int(min_patches)
        if max_patches is not None and max_patches < self.min_patches:
            raise ValueError(f"masking max_patches={max_patches} is below min_patches={self.min_patches}, which leaves most "
                             f"images unmasked; raise max_patches or lower min_patches")
        self.max_patches = max_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """-> bool [num_views, batch_size, h*w] on the CPU; True = masked."""
        V, (H, W) = self.num_views, self.grid
        out = np.zeros((V * batch_size, H, W), dtype=bool)
        draw = torch.rand(V * batch_size, 2, generator=generator, device=generator.device).tolist()
        lo, hi = self.ratio
        for mask, (u_masked, u_ratio) in zip(out, draw):
            if u_masked < self.prob:
                self._fill(mask, (lo + u_ratio * (hi - lo)) * H * W, generator)
        return torch.from_numpy(out).reshape(V, batch_size, H * W)

    def _fill(self, mask: np.ndarray, target: float, g: torch.Generator) -> None:
        """Adds rectangles to `mask` [h, w] in place until `target` patches are masked (iBOT's loop)."""
        H, W = mask.shape
        count = 0
        while count < target:
            left_to_mask = target - count
            if self.max_patches is not None:
                left_to_mask = min(left_to_mask, self.max_patches)
            delta = 0
            for u_area, u_aspect, u_top, u_left in torch.rand(10, 4, generator=g, device=g.device).tolist():  # 10 tries
                area = self.min_patches + u_area * (left_to_mask - self.min_patches)   # random.uniform(min, left)
                aspect = math.exp(self.log_aspect[0] + u_aspect * (self.log_aspect[1] - self.log_aspect[0]))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if h < H and w < W:
                    top, left = int(u_top * (H - h + 1)), int(u_left * (W - w + 1))  # random.randint(0, H - h)
                    block = mask[top:top + h, left:left + w]
                    new = h * w - int(block.sum())
                    if 0 < new <= left_to_mask:
                        block[...] = True
                        delta = new
                        break
            if delta == 0:
                return
            count += delta


class RandomMasking(_Masking):
    """Uniformly random patches, exactly N - int(N * (1 - ratio)) of the N = h*w patches of every view
    of every image (MAE's count), so all masks of a batch have the same number of True.

    Args:
        grid: (h, w) patches per image, or an int for a square grid.
        num_views: views per image that get their own mask.
        ratio: fraction of patches to mask, in [0, 1) (MAE: 0.75).
    """

    def __init__(self, grid: Union[int, Sequence[int]], num_views: int = 1, ratio: float = 0.75):
        super().__init__(grid, num_views)
        if not 0 <= ratio < 1:
            raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
        self.ratio = float(ratio)

    @property
    def num_masked(self) -> int:
        return self.num_patches - int(self.num_patches * (1 - self.ratio))

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """-> bool [num_views, batch_size, h*w] on the generator's device; True = masked."""
        noise = torch.rand(self.num_views, batch_size, self.num_patches, generator=generator, device=generator.device)
        masks = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
        return masks.scatter_(-1, noise.topk(self.num_masked, dim=-1).indices, True)   # the num_masked largest noises


class MultiBlockMasking(_Masking):
    """I-JEPA's multi-block masks (facebookresearch/ijepa, src/masks/multiblock.py MaskCollator): per image,
    `num_targets` target blocks and one context block with the targets removed from it.

    Per batch, one target block size and one context block size (as the official collator): a uniform u gives
    the scale s = lo + u (hi - lo) and, from the same u (the official draws one number for both), the aspect
    r = h / w = a_lo + u (a_hi - a_lo); k = int(h*w patches * s), h = round(sqrt(k r)), w = round(sqrt(k / r)),
    clamped to [1, grid]. Per image: each target's top-left corner uniform over every position where the block
    fits (targets may overlap each other); then the context block's corner, redrawn up to `tries` times until
    the block minus the targets keeps more than min(min_keep, its area - 1) patches; after `tries` failures the
    last target is no longer removed, and so on (the official relaxation), so the draw always ends. The context
    and target index sets are then truncated, as the official collator, to the batch's smallest count (keeping
    the first patches in row-major order), so they stack.

    Returns bool [1 + num_targets, B, h*w]: view 0 = the context, views 1.. = the targets, True = NOT in that
    set (the module's "masked" convention), so `keep_indices(masks[i])` gives set i's patch indices
    (ascending, the same count in every row). Context and targets are disjoint unless the relaxation fired.

    Args:
        grid: (h, w) patches per image (`pretrain.models.vit.patch_grid`), or an int for a square grid.
        num_targets: target blocks per image (I-JEPA: 4).
        target_scale, target_aspect: ranges of the target blocks' area fraction and h / w (0.15-0.2, 0.75-1.5).
        context_scale, context_aspect: the context block's (0.85-1.0, 1.0).
        min_keep: the context keeps more than this many patches when it can (official config: 10).
        tries: corner draws per relaxation level (official: 20).
    """

    def __init__(self, grid: Union[int, Sequence[int]], num_targets: int = 4,
                 target_scale: Tuple[float, float] = (0.15, 0.2), target_aspect: Tuple[float, float] = (0.75, 1.5),
                 context_scale: Tuple[float, float] = (0.85, 1.0), context_aspect: Tuple[float, float] = (1.0, 1.0),
                 min_keep: int = 10, tries: int = 20):
        super().__init__(grid, 1 + num_targets)
        for name, (lo, hi), top in (("target_scale", target_scale, 1), ("context_scale", context_scale, 1),
                                    ("target_aspect", target_aspect, None), ("context_aspect", context_aspect, None)):
            if not 0 < lo <= hi or (top is not None and hi > top):
                raise ValueError(f"masking {name} must be (lo, hi) with 0 < lo <= hi{' <= 1' if top else ''}, "
                                 f"got {(lo, hi)}")
        if min_keep < 0 or tries < 1:
            raise ValueError(f"masking min_keep must be >= 0 and tries >= 1, got {min_keep}, {tries}")
        self.num_targets, self.min_keep, self.tries = int(num_targets), int(min_keep), int(tries)
        self.target_scale, self.target_aspect = tuple(map(float, target_scale)), tuple(map(float, target_aspect))
        self.context_scale, self.context_aspect = tuple(map(float, context_scale)), tuple(map(float, context_aspect))

    def block_size(self, u: float, scale: Tuple[float, float], aspect: Tuple[float, float]) -> Tuple[int, int]:
        """(h, w) of a block from one uniform u in [0, 1) (the official `_sample_block_size`, clamped to the grid)."""
        H, W = self.grid
        k = int(H * W * (scale[0] + u * (scale[1] - scale[0])))
        r = aspect[0] + u * (aspect[1] - aspect[0])
        return min(max(int(round(math.sqrt(k * r))), 1), H), min(max(int(round(math.sqrt(k / r))), 1), W)

    def _context(self, targets: np.ndarray, h: int, w: int, g: torch.Generator) -> np.ndarray:
        """targets bool [T, H, W] of one image -> its context block [H, W] with the targets removed."""
        H, W = self.grid
        need = min(self.min_keep, h * w - 1)   # a block of <= min_keep patches: all of it (never an endless loop)
        for level in range(self.num_targets + 1):
            free = ~targets[:self.num_targets - level].any(0)
            for u_top, u_left in torch.rand(self.tries, 2, generator=g, device=g.device).tolist():
                top, left = int(u_top * (H - h + 1)), int(u_left * (W - w + 1))
                block = np.zeros((H, W), dtype=bool)
                block[top:top + h, left:left + w] = True
                block &= free
                if block.sum() > need:
                    return block
        raise AssertionError("unreachable: with no target removed the block keeps all its patches")

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """-> bool [1 + num_targets, batch_size, h*w] on the generator's device; True = not in that set."""
        (H, W), T, B, g = self.grid, self.num_targets, batch_size, generator
        u_target, u_context = torch.rand(2, generator=g, device=g.device).tolist()
        th, tw = self.block_size(u_target, self.target_scale, self.target_aspect)
        ch, cw = self.block_size(u_context, self.context_scale, self.context_aspect)
        corners = torch.rand(B, T, 2, generator=g, device=g.device).tolist()
        targets = np.zeros((T, B, H, W), dtype=bool)
        contexts = []
        for b in range(B):
            for t, (u_top, u_left) in enumerate(corners[b]):
                top, left = int(u_top * (H - th + 1)), int(u_left * (W - tw + 1))
                targets[t, b, top:top + th, left:left + tw] = True
            contexts.append(self._context(targets[:, b], ch, cw, g))
        sets = np.concatenate([np.stack(contexts)[None], targets]).reshape(T + 1, B, H * W)   # True = in the set
        out = np.ones_like(sets)
        for v, view in enumerate(sets):
            keep = int(view.sum(-1).min())   # the batch's smallest set of this kind: every row keeps that many
            for b, row in enumerate(view):
                out[v, b, np.flatnonzero(row)[:keep]] = False
        return torch.from_numpy(out).to(g.device)
