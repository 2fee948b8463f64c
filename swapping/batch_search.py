"""The largest batch a per-batch plan fits: doubling from a start, then bisection, over a predicate
``fits(batch)`` that is monotone (the planner's search space and models make it so: see
``planner.plan_swaps`` and ``batch_profiles``; tests/test_plan_batches.py checks it by linear scans)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

from .batch_profiles import BatchProfiles
from .plan_models import DiskModel, Settings, predict
from .planner import PlanResult, plan, plan_swaps
from .profile import RECOMPUTE_VARIANTS, RecomputeSpec, variant_key

LIMIT = 1 << 16


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = LIMIT) -> int:
    """Largest batch in 1..``limit`` where ``fits`` holds (0: not even batch 1); each batch asked once."""
    seen: Dict[int, bool] = {}

    def ok(batch: int) -> bool:
        if batch not in seen:
            seen[batch] = fits(batch)
        return seen[batch]

    lo, hi = 0, max(1, min(start, limit))   # fits(lo) (0 stands for "nothing"), not fits(hi) once found
    if ok(hi):
        lo = hi
        while lo < limit:
            hi = min(2 * lo, limit)
            if not ok(hi):
                break
            lo = hi
        else:
            return lo
    else:
        while hi > 1:
            mid = hi // 2
            if ok(mid):
                lo = mid
                break
            hi = mid
        else:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo




# the "largest batch that fits" line: each approach's rows in the per-batch plan (planned: the choice)
APPROACHES: Dict[str, Callable[[str], bool]] = {
    "no swap": lambda row: row == "no swap",
    "recompute only": lambda row: row.startswith("recompute "),
    "swap only": lambda row: row == "swap only",
}


@dataclass
class BatchPlanner:
    """The planner at any batch on ``BatchProfiles``: the per-batch plan, and the largest batch at which
    each approach (or the plan) fits. Plans are kept per batch, so the search and the table agree."""

    source: BatchProfiles
    target: int
    link_bps: float
    threshold: int
    variants: Sequence[RecomputeSpec]
    configured: Optional[Settings] = None
    configured_recompute: RecomputeSpec = None
    disk: Optional[DiskModel] = None     # a disk tier's rates (``swap.disk_dir``) for the time model
    _plans: Dict[Tuple[int, bool], PlanResult] = field(default_factory=dict)

    def plan(self, batch: int, per_module: bool = True) -> PlanResult:
        """The plan at ``batch`` (``per_module=False``: the rows without the per-module search)."""
        if (batch, True) in self._plans:
            return self._plans[(batch, True)]
        if (batch, per_module) not in self._plans:
            profiles = self.source.variants(batch, self.variants)
            spec = (lambda s: self.source.aligned(profiles["none"], s)) if per_module else None
            self._plans[(batch, per_module)] = plan(profiles, self.target, self.link_bps, self.threshold,
                                                    self.configured, self.configured_recompute, profile_spec=spec,
                                                    disk=self.disk)
        return self._plans[(batch, per_module)]

    def fits(self, batch: int, approach: str = "planned") -> bool:
        """Whether ``approach`` (a key of ``APPROACHES``, or the plan) fits at ``batch``: what the plan's
        rows say, computed without the rest of the plan when it has not been made."""
        if approach == "planned":
            return self.plan(batch).chosen is not None
        made = self._plans.get((batch, True)) or self._plans.get((batch, False))
        if made is not None:
            return any(APPROACHES[approach](r.name) and r.fits for r in made.strategies)
        profiles = self.source.variants(batch, self.variants)
        if approach == "swap only":
            return plan_swaps(profiles["none"], self.target, self.link_bps, self.threshold,
                              self.disk)[1].peak_device_bytes <= self.target
        keys = ["none"] if approach == "no swap" else [variant_key(r) for r in RECOMPUTE_VARIANTS[1:]]
        off = Settings(self.threshold, 0, enabled=False)
        return any(predict(profiles[k], off, self.link_bps).peak_device_bytes <= self.target for k in keys)

    def largest(self, start: int, approach: str = "planned", limit: int = LIMIT) -> int:
        return largest_fitting(lambda b: self.fits(b, approach), start, limit)

    def limits(self, start: int) -> Dict[str, int]:
        """Largest batch per approach and for the plan, in the order the report prints them."""
        return {name: self.largest(start, name) for name in [*APPROACHES, "planned"]}


__all__ = ["largest_fitting", "BatchPlanner", "APPROACHES", "LIMIT"]
