"""Tiny nets whose training outputs have torchvision's shapes (not zoo models): configs/googlenet_aux.yaml
and the tests train them in place of torchvision's own (whose registry build is for CUDA and does not
import beside a CPU torch).

``googlenet``: ``torchvision.models.GoogLeNet`` returns ``GoogLeNetOutputs(logits, aux_logits2,
aux_logits1)`` in training; ``fcn``: torchvision's segmentation models return ``{'out': ..., 'aux': ...}``.
lmsdp reads both without glue: the logits, plus ``train.aux_weight`` times each auxiliary head's loss."""
from __future__ import annotations

from collections import namedtuple
from typing import Dict, Union

import torch
from torch import nn

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])  # torchvision's


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class _Head(nn.Sequential):
    """Pool, flatten, classify (GoogLeNet's InceptionAux, small)."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class GoogLeNetShaped(nn.Module):
    """``layers`` conv blocks; auxiliary heads after the first and the second to last, as in GoogLeNet."""

    def __init__(self, num_classes: int = 10, width: int = 32, layers: int = 2, aux_logits: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_block(3 if i == 0 else width, width) for i in range(max(layers, 2))])
        self.aux1 = _Head(width, num_classes) if aux_logits else None
        self.aux2 = _Head(width, num_classes) if aux_logits else None
        self.fc = _Head(width, num_classes)

    def forward(self, x: torch.Tensor) -> Union[GoogLeNetOutputs, torch.Tensor]:
        h = self.blocks[0](x)
        aux1 = self.aux1(h) if self.aux1 is not None else None
        for block in self.blocks[1:-1]:
            h = block(h)
        aux2 = self.aux2(h) if self.aux2 is not None else None
        logits = self.fc(self.blocks[-1](h))
        if self.training and self.aux1 is not None:
            return GoogLeNetOutputs(logits, aux2, aux1)
        return logits  # torchvision: eval mode returns the logits alone


class FCNShaped(nn.Module):
    """A segmentation net returning torchvision's ``{'out': [N, C, H, W], 'aux': [N, C, H, W]}``."""

    def __init__(self, num_classes: int = 4, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(*[_block(3 if i == 0 else width, width) for i in range(layers)])
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.aux_classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return {"out": self.classifier(features), "aux": self.aux_classifier(features)}


def googlenet(num_classes: int = 10, width: int = 32, layers: int = 2, aux_logits: bool = True) -> GoogLeNetShaped:
    return GoogLeNetShaped(num_classes, width, layers, aux_logits)


def fcn(num_classes: int = 4, width: int = 32, layers: int = 2) -> FCNShaped:
    return FCNShaped(num_classes, width, layers)
