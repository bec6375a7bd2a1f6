"""`pretrain reconstruct`: MAE's reconstructions of a few images, drawn as in MAE's demo
(demo/mae_visualize.ipynb): one row each of the originals, the masked inputs (masked patches at the
normalisation mean, i.e. 0 after normalising), the reconstruction with the visible patches pasted back, and the
raw prediction of every patch. Masks come from the run's own masking with a generator seeded by --seed.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def reconstruction_rows(method, images: torch.Tensor, mean, std, generator: torch.Generator) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> [4, N, 3, S, S] in [-1, 1]: original, masked, visible patches pasted onto
    the reconstruction, raw reconstruction. `method` is an MAE (`predict`/`reconstruct`, `masking`)."""
    from pretrain.data.augment import normalize
    from pretrain.methods.mae import unpatchify

    x = normalize(images, mean, std)                                                 # [N, 3, S, S]
    masks = method.masking(len(x), generator)[0]                                     # [N, L] True = masked
    y = method.reconstruct(x, masks)                                                 # [N, 3, S, S]
    m = unpatchify(masks[..., None].float().expand(-1, -1, method.patch[0] * method.patch[1] * 3),
                   method.grid, method.patch)                                        # [N, 3, S, S], 1 = masked
    rows = torch.stack([x, x * (1 - m), x * (1 - m) + y * m, y])                     # [4, N, 3, S, S]
    m_, s_ = (torch.tensor(v, dtype=rows.dtype).view(1, 1, 3, 1, 1) for v in (mean, std))
    return ((rows * s_ + m_) * 2 - 1).clamp(-1, 1)                                   # back to [0, 1], then [-1, 1]


def draw_reconstructions(path, out, images: Optional[List] = None, data: Optional[str] = None, n: int = 8,
                         seed: int = 0) -> dict:
    """Write the grid of `reconstruction_rows` (4 rows, one column per image, each cell nearest-upscaled to
    max(1, 128 // S) x its side) for the image files `images` or the first `n` images of shards `data`, using
    the MAE run (dir or checkpoint) `path`. Returns a summary."""
    from pretrain.evaluation.attention import load_images
    from pretrain.evaluation.generative import save_grid
    from pretrain.export import load_method

    if (images is None) == (data is None):
        raise ValueError("pass the images to reconstruct as either --images FILE [FILE ...] or --data SHARDS (not both)")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    method, cfg, step = load_method(path)
    if cfg.method.name != "mae":
        raise ValueError(f"{path} is a {cfg.method.name} run; `pretrain reconstruct` draws an MAE's reconstructions: "
                         f"pass a run trained with method.name=mae")
    size = cfg.data.image_size
    if images is not None:
        pixels = load_images(images, size)
    else:
        from pretrain.data import eval_loader

        batches = [b["image"] for b in eval_loader(data, n, size, key="--data", max_samples=n)]
        if not batches:
            raise ValueError(f"--data {data} holds no readable image; pass shards written by `pretrain shards`")
        pixels = torch.cat(batches)[:n]
    rows = reconstruction_rows(method.eval(), pixels, list(cfg.data.mean), list(cfg.data.std),
                               torch.Generator().manual_seed(seed))
    cell = size * max(1, 128 // size)
    cells = F.interpolate(rows.flatten(0, 1), size=(cell, cell), mode="nearest")
    grid = save_grid(cells, out, nrow=len(pixels))
    return {"out": str(out), "images": len(pixels), "step": step, "seed": seed,
            "pixels": [grid.shape[-1], grid.shape[-2]], "mask_ratio": cfg.method.mask_ratio}
