"""What both sides of the registry-wide cross-rank proof build: each method from its shipped digits
config (its own heads and hyper-parameters), on a resnet10t at 16 px (a 2-block tiny ViT for methods whose
digits config trains a ViT, or that need one), with the same seed."""
import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.data.views import view_groups
from pretrain.methods import create_method

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import SMALL_VIT  # noqa: E402


def config_path(name: str) -> Path:
    """configs/digits_<name>.yaml (SimCLR's digits recipe is the quickstart's)."""
    return CONFIGS / ("quickstart_digits.yaml" if name == "simclr" else f"digits_{name}.yaml")


def build(name: str, backend: str = "ddp", global_batch: int = 8):
    """(cfg, method) for `name`, in train mode, weights from seed 0."""
    from pretrain.methods import METHODS

    shipped = load_config(str(config_path(name)), ["data.train=unused"])
    vit = SMALL_VIT if METHODS.get(shipped.method.name).requires_vit or shipped.model.name.startswith("vit") else []
    cfg = load_config(str(config_path(name)), ["data.train=unused", "data.val=null", "model.name=resnet10t",
                                               "data.image_size=16", f"train.backend={backend}",
                                               f"train.global_batch_size={global_batch}", "train.channels_last=false",
                                               "deepspeed.zero_stage=2", "train.precision=fp32", *vit])
    torch.manual_seed(0)
    return cfg, create_method(cfg).train()


def inputs(method, batch: int, seed: int = 0) -> dict:
    """A batch: Gaussian views of the sizes the method declares (per size, [V_g, batch, 3, S, S]) and, for a
    method with `masking`, its masks [M, batch, N]."""
    g = torch.Generator().manual_seed(seed)
    out = {"views": [torch.randn(len(idx), batch, 3, side, side, generator=g)
                     for side, idx in view_groups(method.views, 16)]}
    if method.masking is not None:
        out["masks"] = method.masking(batch, g)
    return out


def rank_slice(batch: dict, rank: int, B: int) -> dict:
    """Rank `rank`'s samples [rank*B, (rank+1)*B) of every view (and mask): dim 1 of each tensor."""
    out = {"views": [v[:, rank * B:(rank + 1) * B] for v in batch["views"]]}
    if "masks" in batch:
        out["masks"] = batch["masks"][:, rank * B:(rank + 1) * B]
    return out
