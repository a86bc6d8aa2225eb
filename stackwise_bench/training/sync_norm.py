"""BatchNorm over the whole batch of a run on several CPU ranks (gloo), as ``torch.nn.SyncBatchNorm`` does on GPUs.

torch's SyncBatchNorm needs CUDA kernels (``batch_norm_stats``), so on the CPU each rank would normalise its slice
by the slice's own statistics and N ranks would train another network than one process at the full batch. Here
the per-channel sums of every rank are added with ``torch.distributed.nn.functional.all_reduce``, torch's
collective that autograd differentiates (its backward is the all-reduce of the gradients), so the forward and
backward passes are the whole batch's. The sums are taken in float64, so the statistics are at least as exact as
one process's ``F.batch_norm``. In eval mode (and on one rank) it is a plain BatchNorm2d.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of every rank's slice together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        wide = x.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        local = torch.cat([wide.sum(dim=(0, 2, 3)), (wide * wide).sum(dim=(0, 2, 3)), count])
        with warnings.catch_warnings():  # deprecated for torch's private _functional_collectives, still the public one
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean  # biased, what the batch is normalised by
        self._track(mean.detach(), var.detach(), n.item())
        shape = (1, c, 1, 1)
        y = ((wide - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """The running statistics, updated as ``nn.BatchNorm2d`` updates them (unbiased variance)."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / max(n - 1, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d a :class:`GlooSyncBatchNorm` holding the same parameters and statistics."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        synced = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine)
        synced.track_running_stats = module.track_running_stats
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, name, getattr(module, name))
        synced.train(module.training)
        synced.to(next(module.buffers(), torch.empty(0)).device)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
