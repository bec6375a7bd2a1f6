"""Global (cross-rank) batch norm that works with any process group, gloo on CPU included.

torch.nn.SyncBatchNorm needs CUDA; contrastive methods need global BN statistics to avoid the
"information leak" through per-rank BN (SimCLR, MoCo v3). This one gathers each rank's per-channel
(count, mean, M2) with a differentiable all-gather and combines them with the parallel-variance
formula, as SyncBatchNorm does, so forward and backward equal a single-process BN over the global
batch, also when the mean is large against the std (where E[x^2] - E[x]^2 cancels in fp32).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.comm import world_info
from pretrain.losses.distributed import all_reduce_sum_with_grad


class Fp32BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm computed in fp32 whatever the dtype of its input and weights, returning the input's
    dtype. DeepSpeed's bf16/fp16 modes cast parameters but not buffers, and PyTorch's batch_norm
    rejects half-precision weights with fp32 running statistics; this keeps the statistics in fp32."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        use_batch = self.training or not self.track_running_stats
        m = self.momentum if self.momentum is not None else 0.0   # unused unless the running stats update
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:                              # cumulative average, as in _BatchNorm
                m = 1.0 / float(self.num_batches_tracked)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.batch_norm(x.float(), self.running_mean, self.running_var, w, b, use_batch, m, self.eps).to(x.dtype)


def convert_to_fp32_bn(module: nn.Module) -> nn.Module:
    """Replace plain BatchNorm1d/2d/3d layers (recursively) with Fp32BatchNorm, keeping state."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        new = Fp32BatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for p, q in zip(new.parameters(), module.parameters()):   # a momentum encoder's BN stays frozen
            p.requires_grad_(q.requires_grad)
        return new.to(module.weight.device if module.weight is not None else "cpu")
    for name, child in module.named_children():
        setattr(module, name, convert_to_fp32_bn(child))
    return module


class GlobalBatchNorm(Fp32BatchNorm):
    """Fp32BatchNorm whose training statistics are those of the global batch over all ranks (differentiable:
    gradients equal a single-process BN over the concatenated batch). Eval, and one process, are local."""

    def forward(self, x):
        if not self.training or world_info()[1] == 1:
            return super().forward(x)
        C, shape = x.shape[1], [1, x.shape[1]] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        # two passes over the global batch, each one all-reduce of fixed size (C+1, then C fp32 per layer,
        # whatever the world size): the global mean, then the sum of squared deviations from it. Exact
        # to fp32 at any mean offset, unlike E[x^2] - E[x]^2; a gather of per-rank (count, mean, M2)
        # combined by Chan's formula is one collective, but its bytes grow with the world size.
        stats = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // C])]))   # [C + 1]
        n = stats[-1]
        mean = stats[:C] / n                                                                           # [C]
        var = all_reduce_sum_with_grad((xf - mean.view(shape)).square().sum(dims)) / n   # [C], biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace plain BatchNorm1d/2d/3d layers (recursively) with GlobalBatchNorm, keeping state."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for p, q in zip(new.parameters(), module.parameters()):   # a momentum encoder's BN stays frozen
            p.requires_grad_(q.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Global BN everywhere: timm's converter on CUDA (covers its fused norm+act layers), ours elsewhere."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    return convert_to_global_bn(module)
