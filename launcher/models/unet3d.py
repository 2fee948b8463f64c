"""3D U-Net (Cicek et al.) for volumetric segmentation: the LMS paper's largest-activation workload."""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    def norm_layer(channels: int) -> nn.Module:
        if norm == "group":
            return nn.GroupNorm(min(8, channels), channels)
        return nn.BatchNorm3d(channels)

    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True))


class UNet3D(nn.Module):
    """``levels`` resolutions (each halves D/H/W and doubles channels from ``width``); input
    [batch, in_channels, D, H, W] with D, H, W divisible by 2**(levels-1); output per-voxel logits."""

    # comm.mesh tp > 1: lmsdp.comm.tensor_parallel refuses with this line
    tensor_parallel_refusal = ("its convolutions' activations are far larger than their weights, so splitting "
                               "channels over tp ranks moves more bytes per step than it saves")

    def __init__(self, in_channels: int = 1, classes: int = 2, width: int = 16, levels: int = 4,
                 norm: str = "batch") -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"unet3d needs levels >= 2, got {levels}")
        channels = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for cout in channels:
            self.down.append(_double_conv(cin, cout, norm))
            cin = cout
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for cout in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose3d(cin, cout, 2, stride=2))
            self.merge.append(_double_conv(cout * 2, cout, norm))
            cin = cout
        self.head = nn.Conv3d(cin, classes, 1)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for index, block in enumerate(self.down):
            x = block(x)
            if index < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge):
            x = up(x)
            x = merge(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
