"""Networks for the generative methods: a DCGAN-style decoder/generator and discriminator, a small
UNet with a time embedding (DDPM), and a gated PixelCNN. Each checks the image size it can handle."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.backbone import ModelError


def _power_of_two_steps(image_size: int, what: str, start: int = 4) -> int:
    """How many x2 upsamplings take `start` px to image_size, or a one-line error."""
    n = int(round(math.log2(image_size / start))) if image_size >= start else -1
    if n < 1 or start * 2 ** n != image_size:
        ok = ", ".join(str(start * 2 ** i) for i in range(1, 7))
        raise ModelError(f"{what} generates {start} px x 2^n images; data.image_size={image_size} is not one of {ok}")
    return n


class ConvDecoder(nn.Module):
    """DCGAN-style decoder: z [B, latent] -> [B, out_channels, S, S] (S = 4 * 2^n), no output activation."""

    def __init__(self, latent_dim: int, image_size: int, out_channels: int = 3, width: int = 64):
        super().__init__()
        n = _power_of_two_steps(image_size, "the decoder/generator")
        ch = [width * min(2 ** (n - i), 8) for i in range(n + 1)]                 # widest first
        self.fc = nn.Linear(latent_dim, ch[0] * 16)
        self.c0 = ch[0]
        layers = [nn.BatchNorm2d(ch[0]), nn.ReLU(True)]
        for i in range(n):
            layers += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i + 1]), nn.ReLU(True)]
        layers.append(nn.Conv2d(ch[-1], out_channels, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.fc(z).view(z.shape[0], self.c0, 4, 4))


class DCGANDiscriminatorTrunk(nn.Module):
    """DCGAN discriminator body: [B, 3, S, S] -> features [B, num_features] (strided convs, LeakyReLU)."""

    def __init__(self, image_size: int, width: int = 64):
        super().__init__()
        n = _power_of_two_steps(image_size, "the DCGAN discriminator")
        layers, c = [], 3
        for i in range(n):
            out = width * min(2 ** i, 8)
            layers += [nn.Conv2d(c, out, 4, 2, 1, bias=i == 0)]
            if i:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, True))
            c = out
        self.net = nn.Sequential(*layers)
        self.num_features = c * 16

    def forward(self, x):
        return self.net(x).flatten(1)


# ------------------------------------------------------------------------------------------------ UNet
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def null_labels(y, num_classes: int, n: int, device) -> torch.Tensor:
    """Class labels [n] for a class embedding of num_classes + 1 rows: y, or all the null label (index
    num_classes, the unconditional model of classifier-free guidance) when y is None."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device) if y is None else y.to(device)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int = 8):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(min(groups, cin), cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.t = nn.Linear(tdim, cout)
        self.n2, self.c2 = nn.GroupNorm(min(groups, cout), cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t(temb)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small DDPM UNet: ResBlocks per resolution, x2 down/up sampling, skip connections, time
    embedding. x [B, C, S, S], t [B] (float timesteps, 0..1000 scale), y [B] class labels or None ->
    [B, C, S, S]. S must be divisible by 2^(len(mults) - 1). With num_classes > 0 a learned class embedding is
    added to the time embedding (index num_classes: the null label of classifier-free guidance; y=None: all null)."""

    def __init__(self, image_size: int, channels: int = 3, base: int = 64, mults=(1, 2, 2), blocks: int = 2,
                 num_classes: int = 0, out_channels: int = 0):
        super().__init__()
        f = 2 ** (len(mults) - 1)
        if image_size % f or image_size < f:
            raise ModelError(f"the UNet halves the image {len(mults) - 1} times (method.channel_mults={list(mults)}): "
                             f"data.image_size={image_size} must be a multiple of {f}")
        tdim = base * 4
        self.base = base
        self.temb = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, tdim) if num_classes else None
        self.inp = nn.Conv2d(channels, base, 3, 1, 1)
        self.down, chans, c = nn.ModuleList(), [base], base
        for i, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, base * m, tdim))
                c = base * m
                chans.append(c)
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))
                chans.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, tdim), ResBlock(c, c, tdim)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + chans.pop(), base * m, tdim))
                c = base * m
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, out_channels or channels, 3, 1, 1))

    def forward(self, x, t, y=None):
        dtype = self.inp.weight.dtype   # inputs made in fp32 meet the weights' dtype (bf16/fp16 under DeepSpeed)
        temb = self.temb(timestep_embedding(t, self.base).to(dtype))
        if self.label is not None:
            temb = temb + self.label(null_labels(y, self.num_classes, x.shape[0], x.device))
        h = self.inp(x.to(dtype))
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), temb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


# ------------------------------------------------------------------------------------------------ PixelCNN
def _down_shift(x):   # row i gets row i-1 (zeros at the top)
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _right_shift(x):  # column j gets column j-1
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016) with a vertical stack (rows above) and a
    horizontal stack (pixels to the left in the row), which together have no blind spot."""

    def __init__(self, cin: int, dim: int, k: int, first: bool):
        super().__init__()
        self.first, self.k = first, k
        self.v = nn.Conv2d(cin, 2 * dim, (k // 2 + 1, k))      # padded from above: row i sees rows <= i
        self.h = nn.Conv2d(cin, 2 * dim, (1, k // 2 + 1))      # padded from the left: col j sees cols <= j
        self.v2h = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.h_out = nn.Conv2d(dim, dim, 1)

    @staticmethod
    def _gate(x):
        a, b = x.chunk(2, 1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h):
        k = self.k
        v_pre = self.v(F.pad(v, (k // 2, k // 2, k // 2, 0)))
        h_pre = self.h(F.pad(h, (k // 2, 0, 0, 0)))
        if self.first:   # the first layer must not see the current pixel itself
            h_pre = _right_shift(h_pre)
        # the vertical stack at row i has seen row i: hand the horizontal one only rows < i
        h_pre = h_pre + self.v2h(_down_shift(v_pre))
        h_new = self.h_out(self._gate(h_pre))
        return self._gate(v_pre), (h_new if self.first else h + h_new)


class GatedPixelCNN(nn.Module):
    """x [B, C, H, W] in [-1, 1] -> per-sub-pixel outputs [B, C, out_per_channel, H, W] where the
    output at pixel (i, j) depends only on pixels before it in raster order (all channels)."""

    def __init__(self, channels: int = 3, dim: int = 64, layers: int = 8, kernel: int = 5, out_per_channel: int = 256):
        super().__init__()
        self.channels, self.out_per_channel = channels, out_per_channel
        self.layers = nn.ModuleList([GatedLayer(channels if i == 0 else dim, dim, kernel, i == 0) for i in range(layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, channels * out_per_channel, 1))

    def forward(self, x):
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        out = self.head(h)
        return out.view(x.shape[0], self.channels, self.out_per_channel, *x.shape[2:])
