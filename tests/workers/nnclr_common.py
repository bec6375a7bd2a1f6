"""What tests/test_nnclr.py and its 2-rank worker both build: a small NNCLR (resnet10t, 16 px, small heads,
a support set of 24) with seed-0 weights, and the fixed global batch of each step."""
import torch

from pretrain.config import load_config
from pretrain.methods import create_method

STEPS, GLOBAL_B = 3, 8


def small(*extra):
    cfg = load_config(None, ["data.train=unused", "model.name=resnet10t", "data.image_size=16", "method.name=nnclr",
                             "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32",
                             "method.queue_size=24", "optim.name=sgd", "optim.weight_decay=0.0",
                             f"train.global_batch_size={GLOBAL_B}", "train.channels_last=false", *extra])
    torch.manual_seed(0)
    return cfg, create_method(cfg).train()


def global_batch(step):
    """Two Gaussian views of the GLOBAL_B samples of `step`, with different statistics: [2, GLOBAL_B, 3, 16, 16]."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.stack([torch.randn(GLOBAL_B, 3, 16, 16, generator=g),
                        2 * torch.randn(GLOBAL_B, 3, 16, 16, generator=g) + 1])
