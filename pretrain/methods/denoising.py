"""What the denoising generative methods (`ddpm`, `flow`) share:

* the denoiser, a UNet or a DiT (`method.denoiser`, pretrain/models/denoiser.py), and its EMA, whose decay is
  scheduled (`ema_decay: {start: 0.9999, warmup_steps: 1000}` ramps it up from 0, as the EDM/DiT recipes do);
* class conditioning: `num_classes` > 0 feeds the shards' labels, each replaced by the null label with
  probability `label_dropout` (Ho & Salimans 2022), and `sample(..., cfg=w)` runs classifier-free guidance

      out = out(x, t, null) + w * (out(x, t, y) - out(x, t, null))       (w = 1: the conditional model)

* latent diffusion: with `autoencoder` (a file written by `pretrain export VAE_RUN --which autoencoder`) the
  denoiser works on the frozen VAE's latents z [L] viewed as [L / side^2, side, side] (`latent_side`), scaled
  by `latent_scale` (0: 1 / std of the first batch's latents over all ranks, as Stable Diffusion estimates its
  scale factor), and samples are decoded back to pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain import comm
from pretrain.data.views import IDENTITY
from pretrain.methods.generative import GenerativeMethod
from pretrain.models.denoiser import create_denoiser
from pretrain.models.ema import EMA, momentum_copy
from pretrain.models.generative import null_labels
from pretrain.params import Rule, fraction, integer, integers, non_negative, positive

#: the keys every denoising method takes (a method's own `defaults` add to them)
DENOISING_DEFAULTS = {"denoiser": "unet", "base_channels": 64, "channel_mults": [1, 2, 2], "blocks": 2,
                      "dit_depth": 0, "dit_hidden": 0, "dit_heads": 0, "num_classes": 0, "label_dropout": 0.1,
                      "guidance": 1.0, "autoencoder": "", "latent_side": 4, "latent_scale": 0.0}
DENOISING_CHECKS = {"denoiser": Rule("unet or a DiT name such as DiT-S/2, DiT-B/4, DiT-L/8",
                                     lambda v: v == "unet" or (isinstance(v, str) and v.startswith("DiT-")), ("vit", 3)),
                    "autoencoder": Rule("empty, or an existing file written by `pretrain export VAE_RUN --which "
                                        "autoencoder`", lambda v: v == "" or (isinstance(v, str) and Path(v).is_file()),
                                        (3, "no/such/file.safetensors")),
                    "base_channels": integer(1), "channel_mults": integers(1), "blocks": integer(1),
                    "dit_depth": integer(0), "dit_hidden": integer(0), "dit_heads": integer(0),
                    "num_classes": integer(0), "label_dropout": fraction(), "guidance": positive(),
                    "latent_side": integer(1), "latent_scale": non_negative(), "ema_decay": fraction()}


class DenoisingMethod(GenerativeMethod):
    """Base of ddpm and flow: builds `self.net` / `self.net_ema`, conditions on labels, guides, and maps between
    pixels and the space the denoiser works in (`to_space` / `from_space`)."""

    timm_backbone = False
    scheduled = ("ema_decay",)
    casts_inputs = True      # the denoisers cast x_t and the time embedding: the data stay fp32 for the noising
    #: Ho et al. 2020, appendix B: random horizontal flips on CIFAR-10 ("flips improve sample quality slightly")
    views = (IDENTITY.replace(flip_p=0.5),)

    def __init__(self, backbone: Optional[nn.Module], image_size: int, denoiser="unet", base_channels=64,
                 channel_mults=(1, 2, 2), blocks=2, dit_depth=0, dit_hidden=0, dit_heads=0, num_classes=0,
                 label_dropout=0.1, guidance=1.0, autoencoder="", latent_side=4, latent_scale=0.0, learn_sigma=False):
        super().__init__(backbone, image_size)
        self.backbone = None
        self.num_classes, self.label_dropout, self.guidance = num_classes, label_dropout, guidance
        self.autoencoder = None
        if autoencoder:
            from pretrain.methods.vae import load_autoencoder

            self.autoencoder = load_autoencoder(autoencoder, image_size).requires_grad_(False).eval()
            L = self.autoencoder.latent_dim
            if L % latent_side ** 2:
                raise ValueError(f"the autoencoder's {L} latent dims cannot be viewed as [C, {latent_side}, "
                                 f"{latent_side}]: set method.latent_side to a side whose square divides {L}")
            self.space: Tuple[int, int, int] = (L // latent_side ** 2, latent_side, latent_side)
        else:
            self.space = (3, image_size, image_size)
        # 0 until estimated from the first batch (a buffer: checkpointed, and the same on every rank)
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))
        self.net = create_denoiser(denoiser, self.space[1], self.space[0], num_classes, base_channels=base_channels,
                                   channel_mults=channel_mults, blocks=blocks, dit_depth=dit_depth,
                                   dit_hidden=dit_hidden, dit_heads=dit_heads, learn_sigma=learn_sigma)
        self.net_ema = momentum_copy(self.net)
        self.ema = EMA(self.net_ema, self.net, copy_buffers=True)
        self._register_load_state_dict_pre_hook(_rename_unet)

    @classmethod
    def uses_backbone(cls, kwargs):
        return False   # a pixel-space (or latent-space) model: no timm backbone is built

    def train(self, mode: bool = True):
        super().train(mode)
        if self.autoencoder is not None:   # frozen: its BatchNorm statistics never move
            self.autoencoder.eval()
        return self

    def after_step(self, ctx):
        self.ema.update(ctx["ema_decay"])

    # ---- conditioning --------------------------------------------------------------------------------
    def train_labels(self, batch) -> Optional[torch.Tensor]:
        """The batch's labels [B] with each replaced by the null label w.p. label_dropout; None if unconditional."""
        if not self.num_classes:
            return None
        y = batch["label"].long()
        if ((y < 0) | (y >= self.num_classes)).any():
            raise ValueError(f"labels {sorted(set(y.tolist()))} outside [0, {self.num_classes - 1}]: data.train needs "
                             f".cls labels (-1: none) below method.num_classes={self.num_classes}")
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def guided(self, net, x, t, y, cfg: float) -> torch.Tensor:
        """net's output [B, ...] as fp32 under classifier-free guidance of scale `cfg` (y None or cfg == 1:
        one plain call). Conditional and unconditional halves run as one batch. Only the prediction's C channels
        are guided; extra ones (a learned variance) come from the conditional half, as in DiT's forward_with_cfg."""
        if y is None or cfg == 1.0:
            return net(x, t, y).float()
        null = null_labels(None, self.num_classes, x.shape[0], x.device)
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y.to(x.device), null])).float().chunk(2)
        C = self.space[0]
        return torch.cat([uncond[:, :C] + cfg * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], 1)

    def sample_labels(self, n: int, classes) -> Optional[torch.Tensor]:
        """The classes [n] to sample: `classes` (an int, or one per sample), or 0, 1, ..., num_classes - 1 in
        turn; None for an unconditional model."""
        if not self.num_classes:
            if classes is not None:
                raise ValueError("this model was trained without classes (method.num_classes=0): drop --class")
            return None
        if classes is None:
            return torch.arange(n) % self.num_classes
        y = torch.as_tensor(classes, dtype=torch.long).expand(n) if torch.as_tensor(classes).dim() == 0 \
            else torch.as_tensor(classes, dtype=torch.long)
        if y.numel() != n or (y < 0).any() or (y >= self.num_classes).any():
            raise ValueError(f"--class must be in [0, {self.num_classes - 1}] (method.num_classes), got {classes}")
        return y

    # ---- pixels <-> the denoiser's space ----------------------------------------------------------------
    def model_inputs(self, batch) -> torch.Tensor:
        """What the denoiser learns from this batch [B, C, S, S]: its images (`to_space`), or the latents a latent
        shard carries (`pretrain latents`: the posterior's mean and log variance [B, 2, L], one posterior draw
        here, as Stable Diffusion trains on). The data decides: image shards are encoded on the fly."""
        if "latents" not in batch:
            return self.to_space(batch["views"][0][0])
        if self.autoencoder is None:
            raise ValueError("data.train holds latents (`pretrain latents`): set method.autoencoder to the file they "
                             "were encoded with")
        mu, logvar = batch["latents"].float().unbind(1)                          # [B, L] each
        if mu.shape[1] != self.autoencoder.latent_dim:
            raise ValueError(f"the latent shards hold {mu.shape[1]} dims, method.autoencoder {self.autoencoder.latent_dim}")
        return self._scaled(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))

    @torch.no_grad()
    def to_space(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images in [-1, 1] -> what the denoiser models: the images themselves, or the frozen
        autoencoder's scaled latents [B, C, side, side] (posterior samples, as Stable Diffusion trains on)."""
        if self.autoencoder is None:
            return images.float()
        # the weights' dtype: DeepSpeed's bf16/fp16 casts the frozen autoencoder too, FSDP2 computes in bf16
        return self._scaled(self.autoencoder.encode(images.to(self.autoencoder.to_latent.weight.dtype)))

    @torch.no_grad()
    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B, L] -> [B, C, side, side] times latent_scale (estimated from this batch when still 0:
        1 / std over every rank's latents)."""
        z = z.view(z.shape[0], *self.space)
        if self.latent_scale.item() == 0:
            s = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device)]).double()
            if comm.initialized():
                dist.all_reduce(s)
            mean = s[0] / s[2]
            self.latent_scale.fill_(float(1 / (s[1] / s[2] - mean ** 2).sqrt()))
        return z * self.latent_scale

    @torch.no_grad()
    def from_space(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of to_space: samples in the denoiser's space -> images [B, 3, S, S] in [-1, 1]."""
        if self.autoencoder is None:
            return x.clamp(-1, 1)
        scale = self.latent_scale if self.latent_scale.item() else 1.0   # 0: not estimated yet (an untrained model)
        return self.autoencoder.decode((x / scale).flatten(1)).clamp(-1, 1)


def _rename_unet(state_dict, prefix, *args):
    """Checkpoints from before the DiT option name DDPM's denoiser `unet` / `unet_ema`: read them as net / net_ema."""
    for k in [k for k in state_dict if k.startswith((prefix + "unet.", prefix + "unet_ema."))]:
        state_dict[prefix + "net" + k[len(prefix) + 4:]] = state_dict.pop(k)
    # nor a latent_scale (pixel space only then, where it is unused): 0, the pixel-space value
    state_dict.setdefault(prefix + "latent_scale", torch.tensor(0.0))
