"""Which saved tensors the swap engine may take over, shared by the engine's pack hook and the
planner's step recorder (so a plan's tensor list matches what the engine sees)."""
from __future__ import annotations

import torch


def is_swappable(t: torch.Tensor) -> bool:
    """A plain strided, non-empty activation: not a parameter or a view of one."""
    if t.layout != torch.strided or t.numel() == 0 or (t.requires_grad and t.is_leaf):
        return False
    base = t._base
    if base is not None and base.requires_grad and base.is_leaf:
        return False  # a view of a parameter
    return True
