"""Batch norm over the global batch of all data-parallel processes, on any device and backend (CPU/gloo too).

``torch.nn.SyncBatchNorm`` runs on GPUs only; with per-process statistics, N processes do not compute what one
process computes on the whole batch. :class:`GlobalBatchNorm` does, on CPU as on GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["GlobalBatchNorm", "convert_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum shared by all processes is the sum of their gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch across all processes (each holding an
    equal share); outside a multi-process group, or in eval mode, plain batch norm. Same parameters and buffers
    as the layer it replaces, so state dicts are interchangeable."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count  # biased, as batch norm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1, 1)), alpha=m)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d/2d/3d replaced (in place) by a :class:`GlobalBatchNorm` holding the same
    tensors (values, device, dtype)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        floats = [t for t in module.state_dict().values() if t.is_floating_point()]
        if floats:
            new.to(device=floats[0].device, dtype=floats[0].dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module
