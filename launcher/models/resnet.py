"""ResNet (He et al.) in plain torch, any depth and width: the LMS paper's image workloads."""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
from torch import nn

DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
          101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3]),
          200: ("bottleneck", [3, 24, 36, 3])}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(inplanes: int, outplanes: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    """ResNet with configurable ``depth`` (or explicit ``layers``), base ``width`` and stem.

    ``stem='imagenet'`` is the 7x7/stride-2 + max-pool stem; ``'cifar'`` a 3x3/stride-1 stem for
    small inputs. ``width_multiplier`` scales every stage (wide ResNets)."""

    # comm.mesh tp > 1: lmsdp.comm.tensor_parallel refuses with this line
    tensor_parallel_refusal = ("its convolutions' activations are far larger than their weights, so splitting "
                               "channels over tp ranks moves more bytes per step than it saves")

    def __init__(self, depth: int = 18, num_classes: int = 1000, width: int = 64,
                 width_multiplier: float = 1.0, layers: Optional[Sequence[int]] = None,
                 block: Optional[str] = None, in_channels: int = 3, stem: str = "imagenet") -> None:
        super().__init__()
        if layers is None:
            if depth not in DEPTHS:
                raise ValueError(f"resnet depth {depth} not in {sorted(DEPTHS)}; or give layers=[...]")
            default_block, layers = DEPTHS[depth]
            block = block or default_block
        block_cls: Type[Union[BasicBlock, Bottleneck]] = Bottleneck if (block or "basic") == "bottleneck" else BasicBlock
        base = max(1, int(width * width_multiplier))
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base),
                                      nn.ReLU(inplace=True))
        else:
            raise ValueError(f"resnet stem must be 'imagenet' or 'cifar', got {stem!r}")
        stages: List[nn.Module] = []
        inplanes = base
        for index, count in enumerate(layers):
            planes = base * (2 ** index)
            for block_index in range(count):
                stride = 2 if index > 0 and block_index == 0 else 1
                stages.append(block_cls(inplanes, planes, stride))
                inplanes = planes * block_cls.expansion
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))
