"""The learning rate of each optimizer step: linear warm-up from 0, then constant, cosine or linear
decay to ``optimizer.min_lr`` at the last step. A pure function of the step, so a resumed run's LR
is the uninterrupted run's without any state of its own in the checkpoint."""
from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, total: int, optimizer: Any) -> float:
    """LR of optimizer step ``step`` (1-based) of ``total``, per the ``optimizer:`` config section."""
    peak, low, warmup = optimizer.lr, optimizer.min_lr, optimizer.warmup_steps
    if warmup and step <= warmup:
        return peak * step / warmup
    if optimizer.schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if optimizer.schedule == "cosine":
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak - (peak - low) * progress


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
