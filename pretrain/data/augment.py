"""The SimCLR-family augmentation of one view, split into a cheap per-image geometric stage and a
batched photometric stage. Its parameters are a `ViewSpec` (pretrain/data/views.py); a method declares
one per view and `views.view_augmenters` builds one of these per view.

* geometric (per image, uint8, in the loader workers): random resized crop + horizontal flip.
  Cropping from the decoded original keeps torchvision's RandomResizedCrop semantics for images of
  any size, and yields fixed-size uint8 crops that are cheap to batch and to ship to a GPU.
* photometric (per batch, float): colour jitter, grayscale, Gaussian blur, solarization,
  normalisation, applied to the whole [N, 3, S, S] batch with per-sample random parameters, in the
  worker (CPU training) or on the GPU. Differences from torchvision, on purpose: the jitter ops run in
  a fixed order (brightness, contrast, saturation, hue) and hue is a rotation of the chroma plane in
  YIQ space, which is what lets the whole batch go through one batched matrix multiply.
  Solarization (BYOL: x >= 0.5 -> 1 - x, after the blur) runs on the normalised values, where it is
  the same per-channel reflection; it costs nothing when solarize_p is 0.

All randomness comes from an explicit torch.Generator, so a batch is a function of its seed. A
parameter that is off (hue 0, blur_p 0, solarize_p 0) draws nothing from it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info
from torchvision.transforms.v2 import functional as TF

from pretrain.data.views import ViewSpec

_GRAY = (0.299, 0.587, 0.114)
# RGB <-> YIQ; hue rotation is a rotation of (I, Q)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _uniform(g, n, lo, hi, device="cpu"):
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def crop_params(h: int, w: int, scale, ratio, g: torch.Generator):
    """torchvision's RandomResizedCrop sampling, driven by `g`: returns (top, left, height, width)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = torch.rand(3, generator=g).tolist()
        target = area * (scale[0] + r[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + r[1] * (log_r[1] - log_r[0]))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    # fallback: central crop at the clamped aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def new_batch(shape, device) -> torch.Tensor:
    """torch.empty(shape) (float32) for a batch this stage returns; in shared memory when made on CPU in a
    DataLoader worker, which would otherwise copy the batch there to send it (as torch's default_collate)."""
    if torch.device(device).type == "cpu" and get_worker_info() is not None:
        return torch.empty(0).new(torch.empty(0)._typed_storage()._new_shared(math.prod(shape))).view(shape)
    return torch.empty(shape, device=device)


def gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """[N] sigmas -> [N, k] normalised 1-D Gaussian kernels."""
    x = torch.arange(k, device=sigma.device, dtype=torch.float32) - (k - 1) / 2
    ker = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    return ker / ker.sum(1, keepdim=True)


class SimCLRAugment:
    """Both stages of one view's augmentation; see the module docstring.

    `spec` (default: ViewSpec()) with any of its fields overridden by keyword, e.g.
    SimCLRAugment(32, mean, std, blur_p=0.0).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], spec: Optional[ViewSpec] = None,
                 **params):
        self.spec = s = (spec or ViewSpec()).replace(**params)
        self.size = int(s.size or image_size)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.crop_scale, self.crop_ratio, self.flip_p = tuple(s.crop_scale), tuple(s.crop_ratio), s.flip_p
        self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p = s.jitter_p, s.grayscale_p, s.blur_p, s.solarize_p
        self.brightness, self.contrast, self.saturation, self.hue = s.brightness, s.contrast, s.saturation, s.hue
        self.blur_sigma = tuple(s.blur_sigma)
        k = max(3, int(s.blur_kernel_frac * self.size))
        self.blur_k = k if k % 2 else k + 1

    def photometric_key(self) -> tuple:
        """What the photometric stage depends on: augmenters with equal keys transform alike."""
        return (self.jitter_p, self.brightness, self.contrast, self.saturation, self.hue, self.grayscale_p,
                self.blur_p, self.blur_sigma, self.blur_k, self.solarize_p, self.size,
                tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))

    # ---- stage 1: per image, uint8 -------------------------------------------------------------
    def geometric_params(self, h: int, w: int, g: torch.Generator):
        """The draws of `geometric` for an h x w image: ((top, left, height, width), flip). The device path
        (pretrain/data/device.py) crops with these, so it draws what the worker path draws."""
        box = crop_params(h, w, self.crop_scale, self.crop_ratio, g)
        return box, float(torch.rand(1, generator=g)) < self.flip_p

    def geometric(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """[3, h, w] uint8 -> [3, S, S] uint8 random resized crop, maybe flipped."""
        (top, left, ch, cw), flip = self.geometric_params(img.shape[-2], img.shape[-1], g)
        out = TF.resized_crop(img, top, left, ch, cw, [self.size, self.size], antialias=True)
        return out.flip(-1) if flip else out

    # ---- stage 2: per batch, float ---------------------------------------------------------------
    #: on CPU the batch goes through stage 2 in chunks of about this many bytes (float32), so that
    #: each chunk stays in cache across the dozen passes below instead of streaming from memory
    cpu_chunk_bytes = 2 << 20

    def photometric(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """[N, 3, S, S] uint8 (any device) -> [N, 3, S, S] float32, jittered, blurred, solarized, normalised.

        `g` must live on x's device. All random parameters are drawn for the whole batch first;
        every channel mix is then a batched 3x3 matrix multiply over [n, 3, S*S] and every other
        step an in-place pass, chunk by chunk on CPU.
        """
        dev, N, (H, W) = x.device, x.shape[0], x.shape[-2:]
        # all random parameters first, in a fixed order (the batch is a function of g's seed)
        on = (torch.rand(N, generator=g, device=dev) < self.jitter_p).float()          # [N]

        def factor(strength):                                            # identity where jitter is off
            f = _uniform(g, N, max(0.0, 1 - strength), 1 + strength, dev)
            return (1 + on * (f - 1)).view(N, 1, 1)
        bright, contrast, sat = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        theta = _uniform(g, N, -self.hue, self.hue, dev) * on * 2 * math.pi if self.hue > 0 else None
        to_gray = (torch.rand(N, generator=g, device=dev) < self.grayscale_p).view(N, 1, 1)
        if self.blur_p > 0:
            kernels = gaussian_kernels(_uniform(g, N, *self.blur_sigma, dev), self.blur_k)   # [N, k]
            no_blur = torch.rand(N, generator=g, device=dev) >= self.blur_p
        if self.solarize_p > 0:
            solarize = torch.rand(N, generator=g, device=dev) < self.solarize_p                    # [N]

        # per-image colour matrices
        gray_w = torch.tensor(_GRAY, device=dev)
        eye, to_gray_m = torch.eye(3, device=dev), gray_w.expand(3, 3)  # x -> gray(x) in every channel
        mixes = [sat * eye + (1 - sat) * to_gray_m]                      # saturation: s x + (1 - s) gray(x)
        if theta is not None:                                            # hue: rotate (I, Q)
            c, s = theta.cos(), theta.sin()
            rot = torch.zeros(N, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
            mixes.append(_YIQ2RGB.to(dev) @ rot @ _RGB2YIQ.to(dev))
        # grayscale and normalisation: one affine map per image. The blur may come after it: its
        # kernels sum to 1 and it treats channels alike, so it commutes with per-pixel affine maps.
        mean, std = self.mean.to(dev).view(1, 3, 1), self.std.to(dev).view(1, 3, 1)
        affine, bias = torch.where(to_gray, to_gray_m, eye) / std, -mean / std

        step = N if dev.type != "cpu" else max(1, self.cpu_chunk_bytes // (3 * H * W * 4))
        out = new_batch((N, 3, H * W), dev)
        spare = torch.empty(min(step, N), 3, H * W, device=dev)
        for i in range(0, N, step):
            j = slice(i, i + step)
            y = out[j]
            n = y.shape[0]
            y.copy_(x[j].reshape(n, 3, H * W))                           # (much faster than .float() on CPU)
            y.mul_(bright[j] / 255).clamp_(0, 1)                         # brightness (and uint8 -> [0, 1])
            m = (y.mean(2) @ gray_w).view(n, 1, 1)                       # mean grey level
            y.mul_(contrast[j]).add_(m * (1 - contrast[j])).clamp_(0, 1)  # contrast: m + c (x - m)
            cur, free = y, spare[:n]
            for mix in mixes:
                torch.bmm(mix[j], cur, out=free).clamp_(0, 1)
                cur, free = free, cur
            torch.baddbmm(bias, affine[j], cur, out=free)
            if free is not y:
                y.copy_(free)
            if self.blur_p > 0:
                self._blur_(y.view(n, 3, H, W), kernels[j], no_blur[j])
            if self.solarize_p > 0:
                self._solarize_(y, solarize[j], mean, std)
        return out.view(N, 3, H, W)

    @staticmethod
    def _solarize_(y, on, mean, std, by_index=None):
        """In place, on normalised y [n, 3, H*W]: where `on`, pixels x >= 0.5 become 1 - x. With
        y = (x - m) / s that is y >= (0.5 - m) / s  ->  y' = (1 - 2m) / s - y, per channel.
        On CPU (by_index) only the images drawn for it are touched; on a GPU that would sync."""
        thr, ctr = (0.5 - mean) / std, (1 - 2 * mean) / std                     # [1, 3, 1]
        if y.device.type == "cpu" if by_index is None else by_index:
            idx = on.nonzero().squeeze(1)
            if len(idx):
                z = y.index_select(0, idx)
                y.index_copy_(0, idx, torch.where(z >= thr, ctr - z, z))
            return y
        return y.copy_(torch.where(on.view(-1, 1, 1) & (y >= thr), ctr - y, y))

    def _blur_(self, x, kernels, off):
        """In place: separable Gaussian blur, one [k] kernel per image, skipped where `off`."""
        if x.device.type == "cpu":   # blur only the images drawn for it (on a GPU that would sync)
            idx = (~off).nonzero().squeeze(1)
            if len(idx):
                x.index_copy_(0, idx, self._conv(x.index_select(0, idx), kernels.index_select(0, idx)))
            return x
        k = self.blur_k
        delta = torch.zeros(k, device=x.device)
        delta[k // 2] = 1
        return x.copy_(self._conv(x, torch.where(off[:, None], delta, kernels)))

    def _conv(self, x, ker):
        N, C, H, W = x.shape
        k, pad = self.blur_k, self.blur_k // 2
        ker = ker.repeat_interleave(C, 0)                                 # [N*C, k]
        y = x.reshape(1, N * C, H, W)                                     # depthwise conv, one group per channel
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), ker.view(N * C, 1, 1, k), groups=N * C)
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), ker.view(N * C, 1, k, 1), groups=N * C)
        return y.view(N, C, H, W)


def center_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Eval transform: [3, h, w] uint8 -> shorter side to `size`, centre crop to size x size."""
    img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> float normalised."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s
