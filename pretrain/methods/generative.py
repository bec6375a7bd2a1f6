"""What the generative methods (VAE, GAN, PixelCNN, DDPM) share: one view of [-1, 1] images, a
`sample` hook for grids and metrics, and an optional exact/bound `bits_per_dim` on held-out images."""
from __future__ import annotations

from typing import Optional

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
        """n images [n, 3, S, S] in [-1, 1], reproducible given `generator`."""
        raise NotImplementedError

    @torch.no_grad()
    def bits_per_dim(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """Per-image negative log-likelihood (or its upper bound) in bits/dim, or None for models
        without a likelihood (GAN)."""
        return None

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def randn(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Normal noise, from `generator` (on its own device, then moved) when one is given."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)
