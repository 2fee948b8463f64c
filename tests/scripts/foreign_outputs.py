"""A model whose output lmsdp cannot read (a dataclass without logits), and the user losses that
train it through ``train.loss`` (one of them wrong on purpose)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Scores:
    values: torch.Tensor


class ScoresNet(nn.Module):
    def __init__(self, inputs: int = 12, width: int = 32, classes: int = 4, layers: int = 2) -> None:
        super().__init__()
        sizes = [inputs] + [width] * layers
        self.body = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.Tanh())])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> Scores:
        return Scores(self.head(self.body(x)))


def scores_net(inputs: int = 12, width: int = 32, classes: int = 4, layers: int = 2) -> ScoresNet:
    return ScoresNet(inputs, width, classes, layers)


def scores_loss(output: Scores, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus a small penalty on the scores' size (what a research loss looks like)."""
    return F.cross_entropy(output.values, target) + 0.01 * output.values.pow(2).mean()


def per_sample_loss(output: Scores, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.values, target, reduction="none")  # not a scalar: refused


def one_argument(output: Scores) -> torch.Tensor:
    return output.values.sum()  # cannot be called as f(output, target): refused by the config check
