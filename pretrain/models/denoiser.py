"""The denoising networks of `ddpm` and `flow`, behind one factory. Every one is

    net(x [B, C, S, S], t [B] float timesteps on a 0..1000 scale, y [B] long class labels or None) -> [B, C, S, S]

where class index `num_classes` is the null label (classifier-free guidance's unconditional model) and y=None
means all null. "unet": the small DDPM UNet (pretrain/models/generative.py); "DiT-S/2", "DiT-B/4", ...: the
transformer of Peebles & Xie 2023 (pretrain/models/dit.py).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from pretrain.models.generative import UNet


def create_denoiser(name: str, image_size: int, channels: int = 3, num_classes: int = 0, *,
                    base_channels: int = 64, channel_mults: Sequence[int] = (1, 2, 2), blocks: int = 2,
                    dit_depth: int = 0, dit_hidden: int = 0, dit_heads: int = 0, learn_sigma: bool = False) -> nn.Module:
    """The denoiser `name` for [channels, image_size, image_size] inputs. The UNet reads base_channels,
    channel_mults and blocks; a DiT reads dit_depth / dit_hidden / dit_heads when > 0 (else its named size's).
    learn_sigma: 2 * channels outputs, the prediction then the variance interpolation (improved DDPM, DiT)."""
    if name == "unet":
        return UNet(image_size, channels, base_channels, tuple(channel_mults), blocks, num_classes=num_classes,
                    out_channels=2 * channels if learn_sigma else channels)
    if name.startswith("DiT-"):
        from pretrain.models.dit import create_dit

        sizes = {k: v for k, v in (("depth", dit_depth), ("hidden", dit_hidden), ("heads", dit_heads)) if v}
        return create_dit(name, image_size, channels, num_classes, learn_sigma, **sizes)
    raise ValueError(f"method.denoiser must be unet or a DiT name such as DiT-S/2, DiT-B/4 or DiT-L/8; got {name!r}")
