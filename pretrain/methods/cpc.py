"""CPC on images (van den Oord et al. 2018; Henaff et al. 2019, "CPC v2"): predict the embeddings
of patches further down the image from a context that has only seen the rows above.

For B images [B, 3, S, S]:
    patches  overlapping P x P crops with stride s: a G x G grid, G = (S - P) / s + 1
    z        the backbone (the patch encoder) on every patch              [B, D, G, G]
    c        a row-causal context network over z: c[i, j] sees rows <= i  [B, C, G, G]
    for k in 1..K:  pred_k = W_k c[i, j] should match z[i + k, j]
    loss = mean_k InfoNCE(pred_k, z[k:]): each prediction against every target patch of that
           offset in the global batch (all positions, all images, all ranks), gradients through both.
`pretrain export` writes the patch encoder.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.views import ViewSpec
from pretrain.losses import info_nce
from pretrain.methods.base import Method
from pretrain.methods.registry import METHODS
from pretrain.params import integer, positive


class RowCausalConv(nn.Module):
    """3x3-wide, 2-row conv padded only from above: output row i sees input rows i-1 and i, never below."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=(2, 3))

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 0)))   # (left, right, top, bottom)


def patch_grid(image_size: int, patch_size: int, stride: int) -> int:
    """Grid side G for P x P patches every `stride` pixels, or a one-line error if they don't tile."""
    if not 0 < patch_size <= image_size or stride <= 0 or (image_size - patch_size) % stride:
        fits = [s for s in range(1, patch_size + 1) if (image_size - patch_size) % s == 0] if 0 < patch_size <= image_size else []
        hint = f"; strides that fit: {fits}" if fits else f"; use method.patch_size <= {image_size}"
        raise ValueError(f"CPC patches of method.patch_size={patch_size} every method.patch_stride={stride} px do not "
                         f"tile data.image_size={image_size}: need patch_size <= image_size and "
                         f"(image_size - patch_size) divisible by the stride{hint}")
    return (image_size - patch_size) // stride + 1


@METHODS.register("cpc")
class CPC(Method):
    #: one view, with the image-level augmentation CPC had before views were declared (MoCo v2's). CPC v2
    #: (Henaff et al. 2019) augments each patch separately instead (colour dropping, flips and more),
    #: which a per-image view cannot express: see docs/methods.md.
    views = (ViewSpec(),)
    defaults = {
        "patch_size": 8,
        "patch_stride": 4,          # half the patch: overlapping patches, as in the paper
        "context_dim": 256,
        "context_layers": 2,
        "pred_steps": 2,            # predict 1..K rows below
        "temperature": 0.1,
    }
    checks = {"patch_size": integer(1), "patch_stride": integer(1), "context_dim": integer(1),
              "context_layers": integer(0), "pred_steps": integer(1), "temperature": positive()}

    def __init__(self, backbone: nn.Module, patch_size=8, patch_stride=4, context_dim=256, context_layers=2,
                 pred_steps=2, temperature=0.1, image_size=None):
        super().__init__(backbone)
        image_size = image_size or patch_size + 4 * patch_stride   # without a data config: a 5 x 5 grid
        self.grid = patch_grid(image_size, patch_size, patch_stride)
        if not 1 <= pred_steps < self.grid:
            raise ValueError(f"method.pred_steps={pred_steps} must be in [1, {self.grid - 1}]: the patch grid has "
                             f"{self.grid} rows (data.image_size={image_size}, patch_size={patch_size}, stride={patch_stride})")
        self.patch_size, self.patch_stride, self.temperature = patch_size, patch_stride, temperature
        D = backbone.num_features
        layers = [nn.Conv2d(D, context_dim, 1)]
        for _ in range(context_layers):
            layers += [nn.ReLU(inplace=True), RowCausalConv(context_dim)]
        self.context = nn.Sequential(*layers)
        self.predictors = nn.ModuleList([nn.Conv2d(context_dim, D, 1) for _ in range(pred_steps)])

    def backbone_input_size(self, image_size: int) -> int:
        return self.patch_size

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> patch embeddings [B, D, G, G]."""
        B, P, s = images.shape[0], self.patch_size, self.patch_stride
        p = images.unfold(2, P, s).unfold(3, P, s)                        # [B, 3, G, G, P, P]
        G = p.shape[2]
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(B * G * G, 3, P, P)      # one row per patch
        z = self.backbone(p)                                              # [B*G*G, D]
        return z.view(B, G, G, -1).permute(0, 3, 1, 2)                   # [B, D, G, G]

    @torch.no_grad()
    def features(self, images: torch.Tensor, which: str = "default") -> torch.Tensor:
        """Evaluation features as in CPC v2: the patch embeddings averaged over the grid, [B, D]
        (the exported patch encoder on a whole image is another, usually weaker, option). One backbone: `which`
        must be "default" (export_backbone says so otherwise)."""
        self.export_backbone(which)
        return self.encode_patches(images).mean((2, 3))

    def training_step(self, batch, ctx):
        x = batch["views"][0][0]                                          # [B, 3, S, S]
        z = self.encode_patches(x)                                        # [B, D, G, G]
        c = self.context(z)                                               # [B, C, G, G], row-causal
        G, out = z.shape[2], {}
        for k, W in enumerate(self.predictors, start=1):
            pred = W(c[:, :, :G - k])                                     # [B, D, G-k, G]: rows 0..G-k-1
            target = z[:, :, k:]                                          # [B, D, G-k, G]: rows k..G-1
            rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])   # noqa: E731  [B*(G-k)*G, D]
            out[f"loss_k{k}"] = info_nce(rows(pred), rows(target), self.temperature, grad_through_keys=True)
        out["loss"] = torch.stack(list(out.values())).mean()
        return {"loss": out.pop("loss"), **out}
