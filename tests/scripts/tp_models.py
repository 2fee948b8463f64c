"""A user's model for tensor-parallel tests: two Linear pairs (an MLP with a bottleneck) and a head."""
from __future__ import annotations

import torch
from torch import nn


class TwoPairs(nn.Module):
    def __init__(self, inputs: int = 12, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(inputs, 16)
        self.body = nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, 16), nn.Tanh(),
                                  nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 16))
        self.out = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.inp(x)))


def two_pairs(**kwargs: int) -> nn.Module:
    return TwoPairs(**kwargs)
