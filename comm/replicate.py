"""``strategy: replicate``: every rank holds the whole model and optimizer; the backend's optimizer
allreduces gradients as backward produces them (today's data parallelism)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .strategy import Strategy


class ReplicateStrategy(Strategy):
    """Full replicas; rank 0's state is broadcast at start and after resume."""

    name = "replicate"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
        return self.backend.wrap_optimizer(optimizer, model)

    def sync_state(self, model: nn.Module, optimizer: Any) -> None:
        self.backend.broadcast_state(model, optimizer)

    def clip_grad_norm(self, model: nn.Module, optimizer: Any, max_norm: float, scaler: Any) -> float:
        # The reductions must have landed in p.grad before the norm is taken (both backends'
        # synchronize() is idempotent, so step() does not reduce again).
        optimizer.synchronize()
        return super().clip_grad_norm(model, optimizer, max_norm, scaler)
