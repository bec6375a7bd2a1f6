"""What both sides of the registry-wide cross-rank proof build: each method from its shipped digits
config (its own heads and hyper-parameters), on a resnet10t at 16 px, with the same seed."""
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.data.views import view_groups
from pretrain.methods import create_method

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_path(name: str) -> Path:
    """configs/digits_<name>.yaml (SimCLR's digits recipe is the quickstart's)."""
    return CONFIGS / ("quickstart_digits.yaml" if name == "simclr" else f"digits_{name}.yaml")


def build(name: str, backend: str = "ddp", global_batch: int = 8):
    """(cfg, method) for `name`, in train mode, weights from seed 0."""
    cfg = load_config(str(config_path(name)), ["data.train=unused", "data.val=null", "model.name=resnet10t",
                                               "data.image_size=16", f"train.backend={backend}",
                                               f"train.global_batch_size={global_batch}", "train.channels_last=false",
                                               "deepspeed.zero_stage=2", "train.precision=fp32"])
    torch.manual_seed(0)
    return cfg, create_method(cfg).train()


def inputs(method, batch: int, seed: int = 0):
    """Gaussian views of the sizes the method declares: per size, [V_g, batch, 3, S, S]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(len(idx), batch, 3, side, side, generator=g) for side, idx in view_groups(method.views, 16)]
