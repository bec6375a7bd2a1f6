"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a transformer denoiser on patch
tokens, conditioned on the timestep (and class) through adaLN-Zero. Checked against facebookresearch/DiT
models.py. Per forward, for x [B, C, S, S], p the patch size, N = (S / p)^2 tokens of width D:

    h = PatchEmbed(x) + pos                       [B, N, D]   pos: fixed 2-D sin-cos table (MAE's / DiT's)
    c = MLP(freq256(t)) (+ Embedding(y))          [B, D]      y index num_classes = the null label
    per block: (a1, s1, g1, a2, s2, g2) = Linear(SiLU(c)) (zero-init, so every block starts as the identity)
               h = h + g1 * Attn(LN(h) (1 + s1) + a1);  h = h + g2 * Mlp(LN(h) (1 + s2) + a2)
    out = unpatchify(Linear(LN(h) (1 + s) + a))   [B, C_out, S, S]   (zero-init: the output starts at 0)

Deviations: class-label dropout for classifier-free guidance is the method's job (it passes the null index),
not the model's; the position table is a non-persistent buffer rather than a frozen parameter (so it is not
counted among the parameters, 0.04% of DiT-XL/2's, and no optimizer or sharder sees it).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed

from pretrain.models.backbone import ModelError
from pretrain.models.generative import null_labels, timestep_embedding
from pretrain.models.vit import sincos_pos_embed_2d, unpatchify, xavier_linears

#: (depth, hidden, heads) of the paper's Table 1 sizes; a name's "/p" suffix gives the patch size
DIT_CONFIGS = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
FREQ_DIM = 256   # width of the sinusoidal timestep features fed to the time MLP (DiT's frequency_embedding_size)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D], per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """A pre-norm transformer block whose LayerNorms (no affine) get shift/scale and whose residual branches
    get a gate from the conditioning c, all six from one zero-initialised Linear: at init, the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], c [B, D] -> [B, N, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)   # 6 x [B, D]
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a Linear to p*p*C_out values per token; both Linears zero-initialised."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], c [B, D] -> [B, N, p*p*C_out]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The DiT denoiser: x [B, C, S, S], t [B] float timesteps (0..1000 scale), y [B] long labels or None ->
    [B, C_out, S, S], C_out = 2C with learn_sigma (eps and the variance interpolation, as DiT) else C.

    With num_classes > 0 a class embedding of num_classes + 1 rows is added to the time embedding; row
    num_classes is the null label, and y=None means all null. With num_classes == 0 there is none and y is
    ignored. The blocks are `self.blocks` (entries blocks.N), the unit of FSDP2 sharding and checkpointing."""

    def __init__(self, image_size: int, in_channels: int = 3, patch_size: int = 2, hidden: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 learn_sigma: bool = False):
        super().__init__()
        if image_size % patch_size or image_size < patch_size:
            raise ModelError(f"a DiT with patch size {patch_size} needs an image size divisible by it, got data."
                             f"image_size={image_size}: use a multiple of {patch_size} or a patch size that divides it")
        if hidden % heads or hidden % 4:
            raise ModelError(f"a DiT's width must be divisible by its heads and by 4 (2-D sin-cos table); "
                             f"got hidden={hidden}, heads={heads}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, hidden, bias=True)
        self.grid = tuple(self.x_embedder.grid_size)                                       # (S/p, S/p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid).unsqueeze(0),
                             persistent=False)                                             # [1, N, D]
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier_uniform Linears (zero biases), the patch projection xavier_uniform as
        a Linear, N(0, 0.02) time-MLP and label-table weights, every adaLN modulation and the output Linear zero."""
        xavier_linears(self)
        w = self.x_embedder.proj.weight                                                    # [D, C, p, p]
        with torch.no_grad():
            w.copy_(nn.init.xavier_uniform_(torch.empty_like(w).view(w.shape[0], -1)).view_as(w))
            nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                   self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, S, S], t [B] (float or integer timesteps, 0..1000), y [B] long or None -> [B, C_out, S, S]."""
        dtype = self.x_embedder.proj.weight.dtype   # inputs made in fp32 meet the weights' dtype (bf16 engines)
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)                       # [B, N, D]
        c = self.t_embedder(timestep_embedding(t, FREQ_DIM).to(dtype))                    # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder(null_labels(y, self.num_classes, x.shape[0], x.device))
        for block in self.blocks:
            h = block(h, c)                                                                # [B, N, D]
        h = self.final_layer(h, c)                                                         # [B, N, p*p*C_out]
        return unpatchify(h, self.grid, (self.patch_size, self.patch_size))               # [B, C_out, S, S]


def create_dit(name: str, image_size: int, in_channels: int, num_classes: int, learn_sigma: bool = False,
               **overrides) -> DiT:
    """The DiT named like "DiT-S/2" (size from DIT_CONFIGS, patch size from the suffix) for
    [in_channels, image_size, image_size] inputs; `overrides` (depth, hidden, heads, mlp_ratio) replace the
    named size's values (tiny models for tests and small data)."""
    m = re.fullmatch(r"(DiT-(?:S|B|L|XL))/([1-9]\d*)", name)
    if m is None or m.group(1) not in DIT_CONFIGS:
        raise ModelError(f"unknown DiT {name!r}: use one of {', '.join(DIT_CONFIGS)} with a patch-size suffix, "
                         f"e.g. DiT-S/2, DiT-B/4, DiT-L/8, DiT-XL/2")
    depth, hidden, heads = DIT_CONFIGS[m.group(1)]
    kw = {**dict(depth=depth, hidden=hidden, heads=heads), **overrides}
    return DiT(image_size, in_channels, int(m.group(2)), num_classes=num_classes, learn_sigma=learn_sigma, **kw)


__all__ = ["DiT", "DiTBlock", "FinalLayer", "DIT_CONFIGS", "create_dit", "modulate"]
