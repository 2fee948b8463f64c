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
        if self.layout is not None:  # tp > 1: gradients (local shards) averaged over the dp group only
            return self.backend.wrap_optimizer(optimizer, model, group=self.layout.dp_group,  # type: ignore[call-arg]
                                               group_size=self.layout.dp)
        return self.backend.wrap_optimizer(optimizer, model)

    def sync_state(self, model: nn.Module, optimizer: Any) -> None:
        if self.layout is not None:
            return  # weights broadcast before the split; a resume loads every rank's own shards
        self.backend.broadcast_state(model, optimizer)

    def clip_grad_norm(self, model: nn.Module, optimizer: Any, max_norm: float, scaler: Any) -> float:
        # The reductions must have landed in p.grad before the norm is taken (both backends'
        # synchronize() is idempotent, so step() does not reduce again).
        optimizer.synchronize()
        return super().clip_grad_norm(model, optimizer, max_norm, scaler)
