"""Step profiles at any batch from two fake runs per recompute variant, for the planner's per-batch
search (``lmsrun plan --batch max``, planning for a GPU at a given FLOP rate).

In a fake run with times from FLOPs at a fixed rate, everything a ``StepProfile`` holds is affine in
the batch for these models: tensor bytes, FLOP positions of packs and first uses, module FLOPs and
inputs (``a + b * batch``); the order, modules and packers do not change. So profiles at batch 1 and
2 give the profile at any batch by arithmetic, the same one a fake run at that batch gives (a variant
whose two runs do not line up gets a fake run at each batch; tests/test_plan_batches.py checks the
arithmetic against fake runs for the zoo). A plan at batch B and the search over B then see the very
same profiles, and module sets chosen at several batches are profiled once.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from .profile import (RecomputeSpec, StepProfile, align_times, backward_by_module, profile_workload,
                      variant_key)
from .step_record import Workload

def _affine(a: float, b: float, batch: int) -> float:
    return a + (b - a) * (batch - 1)


def _lines_up(one: StepProfile, two: StepProfile) -> bool:
    if len(one.tensors) != len(two.tensors) or one.recomputed != two.recomputed:
        return False
    if any((x.module, x.use_rank, x.packers) != (y.module, y.use_rank, y.packers) for x, y in zip(one.tensors, two.tensors)):
        return False
    if set(one.module_inputs) != set(two.module_inputs):
        return False
    return all([i for i, _ in one.module_inputs[m]] == [i for i, _ in two.module_inputs[m]] for m in one.module_inputs)


def extrapolate(one: StepProfile, two: StepProfile, batch: int) -> StepProfile:
    """The profile at ``batch`` from profiles at batch 1 and 2 that line up."""
    def num(a: float, b: float) -> float:
        return _affine(a, b, batch)

    def whole(a: int, b: int) -> int:
        return int(round(_affine(a, b, batch)))

    def per_key(a: Dict[str, float], b: Dict[str, float], cast=num) -> Dict[str, float]:  # type: ignore[no-untyped-def]
        return {k: cast(a.get(k, 0), b[k]) for k in b}

    tensors = [dataclasses.replace(y, nbytes=whole(x.nbytes, y.nbytes), pack_s=num(x.pack_s, y.pack_s),
                                   use_s=num(x.use_s, y.use_s) if y.use_s >= 0 else y.use_s)
               for x, y in zip(one.tensors, two.tensors)]
    inputs = {m: [(i, whole(n1, n2)) for (i, n1), (_, n2) in zip(one.module_inputs[m], ins)]
              for m, ins in two.module_inputs.items()}
    return dataclasses.replace(
        two, batch=batch, tensors=tensors, forward_s=num(one.forward_s, two.forward_s),
        backward_s=num(one.backward_s, two.backward_s), workspace_bytes=2 * max((t.nbytes for t in tensors), default=0),
        flops=whole(one.flops, two.flops), module_flops=per_key(one.module_flops, two.module_flops, whole),
        module_forward_s=per_key(one.module_forward_s, two.module_forward_s),
        module_backward_s=backward_by_module(tensors),
        module_forward_flops=per_key(one.module_forward_flops, two.module_forward_flops, whole),
        module_inputs=inputs, held_bytes=whole(one.held_bytes, two.held_bytes),
        timed=two.timed.replace("batch 2", f"batch {batch}"))


class BatchProfiles:
    """Profiles of ``workload`` at any batch, times from FLOPs at ``flops_rate`` (FLOP/s)."""

    def __init__(self, workload: Workload, flops_rate: float, optimizer_bytes: int, device: str = "cpu") -> None:
        self.workload, self.rate, self.optimizer_bytes, self.device = workload, flops_rate, optimizer_bytes, device
        self._pairs: Dict[str, Optional[Tuple[StepProfile, StepProfile]]] = {}
        self._direct: Dict[Tuple[str, int], StepProfile] = {}

    def _run(self, batch: int, spec: RecomputeSpec) -> StepProfile:
        key = (variant_key(spec), batch)
        if key not in self._direct:
            self._direct[key] = profile_workload(self.workload, batch, spec, self.device, 0, self.optimizer_bytes,
                                                 self.rate)
        return self._direct[key]

    def profile(self, batch: int, spec: RecomputeSpec, once: bool = False) -> StepProfile:
        """What ``profile_workload`` gives at ``batch`` for ``spec`` at this rate (not yet aligned).
        ``once``: a spec likely asked at this batch only (a module set the per-module search tries) is
        run at that batch; asked at a second batch, it gets its two runs like the variants."""
        key = variant_key(spec)
        ran = [b for k, b in self._direct if k == key]
        if key not in self._pairs and (batch in ran or (once and not ran)):
            return dataclasses.replace(self._run(batch, spec))
        if key not in self._pairs:
            one, two = self._run(1, spec), self._run(2, spec)
            self._pairs[key] = (one, two) if _lines_up(one, two) else None
        pair = self._pairs[key]
        if batch in (1, 2) or pair is None:
            return dataclasses.replace(self._run(batch, spec))
        return extrapolate(pair[0], pair[1], batch)

    def variants(self, batch: int, specs: Sequence[RecomputeSpec]) -> Dict[str, StepProfile]:
        """``profile_variants`` at ``batch``: one profile per variant, each aligned to the base step."""
        out = {"none": self.profile(batch, None)}
        for spec in specs:
            key = variant_key(spec)
            if key not in out:
                out[key] = self.aligned(out["none"], spec)
        return out

    def aligned(self, base: StepProfile, spec: List[str]) -> StepProfile:
        """``profile_aligned``: ``spec`` at the base profile's batch, times aligned to the base step."""
        prof = self.profile(base.batch, spec, once=True)
        prof.tensors = [dataclasses.replace(t) for t in prof.tensors]
        align_times(prof, base)
        return prof


__all__ = ["BatchProfiles", "extrapolate"]
