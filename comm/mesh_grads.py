"""Gradient norm and clipping on a (dp, tp) mesh: each gradient element counted once.

A rank adds its local gradient's squares only if it owns that copy: along every mesh dimension the
gradient is not sharded over (a Replicate placement, or a dimension its DTensor's mesh lacks), only
index 0 counts. The sum is all-reduced over every rank, so the norm is the whole model's and the
same on every rank, for replicate (plain DP over dp, DTensors over tp) and for shard (FSDP2's 2-D
DTensors) alike."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from .mesh import DIMS, MeshLayout


def _owns(grad: Any, layout: MeshLayout) -> bool:
    coords = {"dp": layout.dp_rank, "tp": layout.tp_rank}
    mesh = getattr(grad, "device_mesh", None)
    names = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
    placements = tuple(grad.placements) if mesh is not None else ()
    for dim in DIMS:
        sharded = dim in names and placements[names.index(dim)].is_shard()
        if not sharded and coords[dim] != 0:
            return False
    return True


def _local(t: Any) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def clip_mesh_grads(params: Iterable[torch.nn.Parameter], max_norm: float, layout: MeshLayout) -> float:
    """Clip every gradient by the whole model's norm (as ``clip_grad_norm_``); returns that norm."""
    grads = [p.grad for p in params if p.grad is not None]
    device = _local(grads[0]).device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if _owns(g, layout):
            total += _local(g).detach().float().pow(2).sum()
    dist.all_reduce(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        _local(g).detach().mul_(coef.to(_local(g).dtype))
    return float(norm)
