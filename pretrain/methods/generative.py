"""What the generative methods (VAE, GAN, PixelCNN, DDPM) share: one view of [-1, 1] images, a
`sample` hook for grids and metrics, and an optional exact/bound `bits_per_dim` on held-out images."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from pretrain.data.views import IDENTITY
from pretrain.methods.base import Method


class GenerativeMethod(Method):
    """A method that models images x in [-1, 1] (data.mean = data.std = 0.5, checked by create_method)."""

    #: one view, no augmentation: the models should learn the images, not their augmentations
    views = (IDENTITY,)
    #: the data normalisation these methods need: pixels (k / 255 - 0.5) / 0.5 = 2k/255 - 1
    pixel_mean_std = (0.5, 0.5)

    def __init__(self, backbone: nn.Module, image_size: int):
        super().__init__(backbone)
        self.image_size = image_size

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
        """n images [n, 3, S, S] in [-1, 1], reproducible given `generator`: one torch.Generator, or a list of n
        (one per sample, `sample_generators`), so that sample i is the same whatever batch it is drawn in."""
        raise NotImplementedError

    @torch.no_grad()
    def bits_per_dim(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """Per-image negative log-likelihood (or its upper bound) in bits/dim, or None for models
        without a likelihood (GAN)."""
        return None

    def _device(self) -> torch.device:
        return next(self.parameters()).device


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def sample_generators(seed: int, indices: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per sample index: sample i's noise depends on (seed, i) only, so any split of the
    indices over ranks and batches draws the same sample i (sharded evaluation; `pretrain sample`)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def _draw(fn, shape, generator: Generators, device, **kw) -> torch.Tensor:
    if generator is None:
        return fn(shape, device=device, **kw)
    if isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, device=generator.device, **kw).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-sample generators for {shape[0]} samples")
    return torch.stack([fn(tuple(shape[1:]), generator=g, device=g.device, **kw) for g in generator]).to(device)


def randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Normal noise [shape] on `device`: from `generator` (on its own device, then moved) when one is given;
    from generator[i] for row i when it is a list of per-sample generators (`sample_generators`)."""
    return _draw(torch.randn, shape, generator, device).to(dtype)


def rand(shape, generator: Generators, device) -> torch.Tensor:
    """Uniform [0, 1) noise, drawn as `randn` draws its normal noise."""
    return _draw(torch.rand, shape, generator, device)


def multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per row of probs [n, K] -> [n] (CPU); with per-sample generators, row i from generator[i]
    when probs has one row per sample, or a block of rows per sample (probs [n * k, K])."""
    probs = probs.cpu()
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).view(-1)
    per = probs.shape[0] // len(generator)
    return torch.cat([torch.multinomial(p, 1, generator=g).view(-1) for p, g in zip(probs.split(per), generator)])
