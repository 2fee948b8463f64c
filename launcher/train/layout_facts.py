"""What the layout planner (``lmsdp.swapping.layout``) needs to know about the job's model beyond the
step profile: the tensor-parallel split at each candidate degree (from ``comm.tensor_parallel``'s
plan, in the profile's module names, with the activation collectives' bytes at the planned batch),
the shard units FSDP2 gathers one at a time, and the share of the machine each rank computes on.
Shared by ``lmsrun plan`` (tools/plan_layout.py) and ``comm.mesh: auto`` at job start (job_layout.py)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from lmsdp.launcher.config.errors import UserError


def activation_rows(workload: Any, batch: int, names: List[str]) -> Dict[str, Tuple[int, int]]:
    """(rows, element size) of each named module's output in one fake forward at ``batch``: a
    collective on ``features`` of that module moves rows x features x element size bytes."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    out: Dict[str, Tuple[int, int]] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        model = workload.build_model()
        modules = dict(model.named_modules())

        def hook(name: str) -> Any:
            def record(_module: Any, _inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.dim() >= 1 and name not in out:
                    out[name] = (output.numel() // max(1, output.shape[-1]), output.element_size())
            return record

        handles = [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]
        inputs, targets = workload.make_batch(batch)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=workload.autocast or torch.bfloat16,
                                                 enabled=workload.autocast is not None):
                if workload.forward is not None:
                    workload.forward(model, inputs, targets)
                else:
                    model(inputs)
        finally:
            for h in handles:
                h.remove()
    return out


def tp_split(model: Any, plan: Any, tp: int, rows: Dict[str, Tuple[int, int]]) -> Any:
    """The ``TPSplit`` of ``plan`` (a ``TensorParallelPlan``) at degree ``tp``: regions whose saved
    activations are per-rank parts (containers gathered once, row-parallel layers and what sits between
    a column-parallel layer and its row-parallel partner, sequence-parallel norms), column-parallel
    layers whose saved input stays whole, and every activation collective's bytes."""
    from lmsdp.swapping.layout_profile import TPSplit

    styles = dict(plan.styles)
    kinds = {s.name: s.kind for s in plan.splits}
    regions = [n for n, s in styles.items() if s == "gather_input"
               or (s == "rowwise" and kinds.get(n) == "Linear")
               or (s == "sequence_parallel" and plan.sequence_parallel)]
    whole = [n for n, s in styles.items() if s in ("colwise", "colwise_gather")]
    regions += _between_pairs(model, styles)
    compute = sorted(set(regions) | {n for n, s in styles.items() if s in ("colwise", "rowwise", "colwise_gather")})
    collectives = []
    for c in plan.collectives:
        n_rows, size = rows.get(c.module, (0, 4))
        collectives.append((c.op, c.nbytes(n_rows, size)))
    return TPSplit(tp, tuple(sorted(set(regions))), tuple(whole), tuple(compute), plan.split_bytes,
                   tuple(collectives))


def _between_pairs(model: Any, styles: Dict[str, str]) -> List[str]:
    """Siblings after a column-parallel Linear up to its row-parallel partner (an auto plan's pair
    without a container): their saved activations are split."""
    out: List[str] = []
    for parent_name, parent in model.named_modules():
        inside = False
        for child_name, _child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            style = styles.get(name)
            if style == "colwise":
                inside = True
            elif inside:
                out.append(name)
                if style == "rowwise":
                    inside = False
    return out


def shard_units(model: Any, names: List[str]) -> Tuple[int, int]:
    """(count, largest parameter bytes) of the modules FSDP2 shards one by one (the root counts one)."""
    from lmsdp.comm.shard import shard_units as units_of

    units = units_of(model, names)
    sizes = [sum(p.nbytes for p in u.parameters()) for u in units]
    return len(units) + 1, max(sizes, default=sum(p.nbytes for p in model.parameters()))


def model_facts(config: Any, workload: Any, batch: int, world: int) -> Any:
    """``ModelFacts`` for every tp degree dividing ``world``: the split where the TP plan exists,
    the plan's one-line reason where it does not (e.g. tp does not divide the heads)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmsdp.comm.tensor_parallel import plan_tensor_parallel
    from lmsdp.swapping.layout import ModelFacts
    from lmsdp.swapping.layout_profile import TPSplit

    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        model = workload.build_model()
        count, largest = shard_units(model, list(config.comm.shard_modules))
        plans, refused = {}, {}
        for tp in (t for t in range(2, world + 1) if world % t == 0):
            try:
                plans[tp] = plan_tensor_parallel(model, config.comm.tp_plan or None,
                                                 bool(config.comm.sequence_parallel), tp)
            except UserError as exc:
                refused[tp] = str(exc)  # the TP plan's own line (comm.mesh.tp: ...)
    names = sorted({c.module for p in plans.values() for c in p.collectives})
    rows = activation_rows(workload, batch, names) if names else {}
    splits = {1: TPSplit()}
    splits.update({tp: tp_split(model, p, tp, rows) for tp, p in plans.items()})
    return ModelFacts(count, largest, splits, refused)


def rank_threads(config: Any, world: int) -> int:
    """Intra-op threads one rank of a ``world``-rank job on this host computes with (launch.threads)."""
    threads = config.launch.threads
    if isinstance(threads, int) and threads > 0:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, world))


def compute_scale(config: Any, world: int, device: Any) -> float:
    """How much slower a rank computes than the profiled step: on a CPU, ranks beyond the cores share
    them (each GPU rank has its own device: 1)."""
    if device.type == "cuda":
        return 1.0
    return max(1.0, world * rank_threads(config, world) / (os.cpu_count() or 1))


__all__ = ["activation_rows", "tp_split", "shard_units", "model_facts", "rank_threads", "compute_scale"]
