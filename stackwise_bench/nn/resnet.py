"""The small CIFAR ResNets (He et al., 6n+2 layers) in plain torch, with stochastic depth."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

RESNET_BLOCKS = {"resnet8": 1, "resnet14": 2}  # BasicBlocks per stage; depth = 6n + 2


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample (timm's DropPath, without importing timm)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut (1x1 conv + BN where the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(self.downsample(x) + _drop_path(out, self.drop_path, self.training))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, widths 16-32-64) with named stages for hooks.

    Modules: ``stem`` (3x3 conv, BN, ReLU), ``stage1..3`` (n BasicBlocks each, the
    last two downsampling by 2), ``pool`` (global average) and ``head`` (Linear).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int, widths=(16, 32, 64), drop_path_rate: float = 0.0):
        super().__init__()
        n = blocks_per_stage
        # Stochastic depth grows linearly with block index, as in timm.
        rates = torch.linspace(0, drop_path_rate, 3 * n).tolist()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                bn=nn.BatchNorm2d(widths[0]),
                act=nn.ReLU(inplace=True),
            )
        )
        self.stage1 = self._stage(widths[0], widths[0], n, 1, rates[0:n])
        self.stage2 = self._stage(widths[0], widths[1], n, 2, rates[n : 2 * n])
        self.stage3 = self._stage(widths[1], widths[2], n, 2, rates[2 * n :])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(widths[2], num_classes)
        self.num_classes, self.num_features = num_classes, widths[2]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # No zero-init of the last BN gamma: it helps very deep nets, and with 8-14 layers
        # it would only hold every residual conv at zero gradient for the first steps.

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int, rates: list[float]) -> nn.Sequential:
        return nn.Sequential(
            *[BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, rates[i]) for i in range(n)]
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x)))
