"""Which saved tensors the swap engine may take over, shared by the engine's pack hook and the
planner's step recorder (so a plan's tensor list matches what the engine sees)."""
from __future__ import annotations

import torch


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """``t`` is autocast's low-precision copy of a parameter (``ToCopyBackward0`` straight onto the
    parameter's ``AccumulateGrad``): rebuilt every step from the weight, so swapping it only moves
    weight bytes over the link twice per step."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    nxt = fn.next_functions
    return bool(nxt) and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad"


def is_swappable(t: torch.Tensor) -> bool:
    """A plain strided, non-empty activation: not a parameter, a view of one, or autocast's cast of one.

    A view is judged by its base: ``DTensor.from_local`` (tensor parallelism's replicated inputs, the
    norms' inputs) wraps ``x.view_as(x)``, a local tensor autograd reports as a leaf requiring grad
    although its base ``x`` is an activation (judged by the view itself, every such input stayed put)."""
    if t.layout != torch.strided or t.numel() == 0:
        return False
    base = t._base
    if base is None and t.requires_grad and t.is_leaf:
        return False  # a parameter (or another leaf the user asked gradients of)
    if base is not None and ((base.requires_grad and base.is_leaf) or _is_parameter_cast(base)):
        return False  # a view of a parameter or of its cast (linear saves the cast weight transposed)
    return not _is_parameter_cast(t)
