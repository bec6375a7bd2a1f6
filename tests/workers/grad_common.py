"""The model both sides of the gradient proof build: same seed, same architecture."""
import torch

from pretrain.methods.simclr import SimCLR
from pretrain.models import create_backbone


def build_method():
    torch.manual_seed(0)
    return SimCLR(create_backbone("resnet10t"), temperature=0.2, proj_hidden_dim=32, proj_dim=16).train()
