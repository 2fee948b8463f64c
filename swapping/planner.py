"""Swap planner: choose per saved tensor whether it stays on the device, is swapped, or (per layer
kind or per module) recomputed, for a memory target; plan files.

The step is profiled by ``profile`` and each choice is costed by the models in ``plan_models``.
``plan``: for each recompute variant (none, the cheap-layer ``auto`` rule, every cheap kind, and module
sets chosen by ``recompute_plan``) swap prefixes of batch-independent tensor orders (``plan_swaps``),
try prefetch depths, keep the fastest plan that fits; when nothing fits, report the lowest peak among
the plans searched. The largest batch a plan fits is ``batch_search`` (on ``batch_profiles``);
``max_batch`` here is the sizes-only bound ``lmsrun tune`` uses (no engine, or every candidate swapped).
Everything is deterministic (no timing enters a decision twice: the profile is taken once and every rank
receives the same plan).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .plan_models import DiskModel, Prediction, Settings, predict
from .policy import PlanPolicy, SwapPolicy, ThresholdPolicy
from .profile import RECOMPUTE_VARIANTS, RecomputeSpec, StepProfile, Workload, sizes_profile, variant_key
from .units import format_size

PREFETCH_DEPTHS = (1, 2, 3, 4, 6, 8)
SCAN_PREFIXES = 32  # prefixes per ranking scanned when no whole ranking fits (all of them when fewer)
PLAN_FORMAT = 2   # 2: swap.recompute may list module names (plan.recompute_modules); format 1 still loads
PER_MODULE = "planned (per-module recompute)"


def policy_for(settings: Settings, profile: Optional[StepProfile] = None) -> SwapPolicy:
    """The engine policy that carries out ``settings`` (a PlanPolicy needs the profile's sizes/order)."""
    if settings.swap is None:
        return ThresholdPolicy(settings.threshold, settings.prefetch, settings.keep_last, settings.budget)
    assert profile is not None
    cand = profile.candidates(settings.threshold)
    sizes = [profile.tensors[i].nbytes for i in cand]
    order = sorted((s for s, i in enumerate(cand) if profile.tensors[i].use_rank >= 0),
                   key=lambda s: profile.tensors[cand[s]].use_rank)
    return PlanPolicy(settings.threshold, settings.prefetch, settings.swap, sizes, order)


# ------------------------------------------------------------------------------------------ planner
@dataclass
class PlanStrategy:
    """One row of the comparison: a way to run the step and what the models predict for it."""

    name: str
    recompute: RecomputeSpec
    settings: Settings
    prediction: Prediction
    fits: bool


@dataclass
class PlanResult:
    target: int
    link_bps: float
    batch: int
    chosen: Optional[PlanStrategy]
    strategies: List[PlanStrategy]
    min_peak: int
    profiles: Dict[str, StepProfile] = field(default_factory=dict)

    def shortfall(self) -> str:
        """Why nothing fits, in words: ``min_peak`` is the lowest predicted peak of every plan the search
        evaluated (swap prefixes, recompute per kind and per module), not a proven lower bound."""
        return (f"the lowest peak among the plans searched is {format_size(self.min_peak)}; "
                f"target is {format_size(self.target)}")

    @property
    def profile(self) -> Optional[StepProfile]:
        return self.profiles.get(variant_key(self.chosen.recompute)) if self.chosen else None


def recompute_label(recompute: RecomputeSpec) -> str:
    """Short name of a recompute variant for tables."""
    if recompute == RECOMPUTE_VARIANTS[2]:
        return "all cheap"
    if isinstance(recompute, list) and len(recompute) > 3:
        return f"{len(recompute)} modules"
    return variant_key(recompute)


def swap_rankings(profile: StepProfile, link_bps: float, threshold: int) -> List[List[int]]:
    """Candidate seqs in the orders the swap search takes prefixes of: most slack per byte (time from pack
    to first use against the transfer time), largest first, earliest packed first (a slow link frees
    only what it has carried by the forward peak: the early tensors). With sizes and times linear in
    the batch these orders do not depend on it, so a prefix that fits at one batch is tried at every
    smaller one."""
    cand = profile.candidates(threshold)
    t = profile.tensors

    def slack(s: int) -> float:
        x = t[cand[s]]
        used = x.use_s if x.use_rank >= 0 else profile.backward_s
        return (profile.forward_s - x.pack_s + used) / max(1e-12, 2 * x.nbytes / link_bps)

    every = range(len(cand))
    return [sorted(every, key=lambda s: (-slack(s), s)), sorted(every, key=lambda s: (-t[cand[s]].nbytes, s)),
            list(every)]


def _grid(n: int) -> List[int]:
    if n + 1 <= SCAN_PREFIXES:
        return list(range(n + 1))
    return sorted({round(i * n / (SCAN_PREFIXES - 1)) for i in range(SCAN_PREFIXES)})


def plan_swaps(profile: StepProfile, target: int, link_bps: float, threshold: int,
               disk: Optional[DiskModel] = None) -> Tuple[Settings, Prediction]:
    """Fastest per-tensor plan for ``profile`` under ``target`` device bytes, else the smallest peak found.

    Per ranking and prefetch depth: when swapping the whole ranking fits, the fewest swaps that fit
    (bisection). With a slow link swapping more can raise the peak (later swap-outs queue behind
    earlier ones and stay on the device longer), so when no whole ranking fits, a fixed grid of prefixes
    of every ranking is scanned (peaks only, the shallowest window), and the depths are tried on those
    that fit."""
    rankings = swap_rankings(profile, link_bps, threshold)
    best: Optional[Tuple[Settings, Prediction]] = None

    def key(found: Tuple[Settings, Prediction]) -> tuple:
        pred = found[1]
        fits = pred.peak_device_bytes <= target
        return (not fits, pred.step_s if fits else pred.peak_device_bytes, len(found[0].swap or []))

    def at(ranking: List[int], k: int, depth: int, timed: bool = True) -> Tuple[Settings, Prediction]:
        settings = Settings(threshold, depth, swap=sorted(ranking[:k]))
        return settings, predict(profile, settings, link_bps, timed, disk)

    for ranking in rankings:
        for depth in PREFETCH_DEPTHS:
            # the device peak falls as more tensors leave while the link keeps up: the fewest swaps that fit
            lo, hi = 0, len(ranking)
            if at(ranking, hi, depth, timed=False)[1].peak_device_bytes <= target:
                while lo < hi:  # on peaks alone; the time of the one found is replayed below
                    mid = (lo + hi) // 2
                    if at(ranking, mid, depth, timed=False)[1].peak_device_bytes <= target:
                        hi = mid
                    else:
                        lo = mid + 1
            found = at(ranking, hi, depth)
            if best is None or key(found) < key(best):
                best = found
    assert best is not None
    if best[1].peak_device_bytes > target:
        for ranking in rankings:
            for k in _grid(len(ranking)):
                peak = at(ranking, k, PREFETCH_DEPTHS[0], timed=False)
                if peak[1].peak_device_bytes > target:
                    best = min(best, peak, key=key)
                    continue
                for depth in PREFETCH_DEPTHS:
                    best = min(best, at(ranking, k, depth), key=key)
    if best[1].peak_device_bytes > target:  # the smallest peak may come from the scan: time it
        best = best[0], predict(profile, best[0], link_bps, disk=disk)
    return best


def plan(profiles: Dict[str, StepProfile], target: int, link_bps: float, threshold: int,
         config_settings: Optional[Settings] = None, config_recompute: RecomputeSpec = None,
         profile_spec: Optional[Callable[[List[str]], StepProfile]] = None,
         disk: Optional[DiskModel] = None) -> PlanResult:
    """Compare strategies on the profiled variants and pick the fastest one that fits ``target``.
    With ``profile_spec`` (profiles a list of module names exactly) recompute is also chosen per
    module (``recompute_plan``); that row is never worse than the best per-kind plan, whose module
    set is one of the sets it may choose. ``disk``: a disk tier's rates in the time model."""
    base = profiles["none"]
    rows: List[PlanStrategy] = []

    def row(name: str, recompute: RecomputeSpec, settings: Settings) -> PlanStrategy:
        pred = predict(profiles[variant_key(recompute)], settings, link_bps, disk=disk)
        st = PlanStrategy(name, recompute, settings, pred, pred.peak_device_bytes <= target)
        rows.append(st)
        return st

    row("no swap", None, Settings(threshold, 0, enabled=False))
    if config_settings is not None:
        row("configured", config_recompute if variant_key(config_recompute) in profiles else None, config_settings)
    for r in RECOMPUTE_VARIANTS[1:]:
        if variant_key(r) in profiles:
            row(f"recompute {recompute_label(r)}", r, Settings(threshold, 0, enabled=False))
    settings, _ = plan_swaps(base, target, link_bps, threshold, disk)
    row("swap only", None, settings)
    planned: List[PlanStrategy] = []
    for key, prof in profiles.items():
        if key == "none":
            continue
        s, _ = plan_swaps(prof, target, link_bps, threshold, disk)
        planned.append(PlanStrategy("", prof.recompute, s, predict(prof, s, link_bps, disk=disk), False))
    if profile_spec is not None:
        rows.append(_per_module(profiles, target, link_bps, threshold, profile_spec, planned, disk))
    candidates = [r for r in rows if r.name != "configured"] + planned
    fitting = [c for c in candidates if c.prediction.peak_device_bytes <= target]
    min_peak = min(c.prediction.peak_device_bytes for c in candidates)
    chosen = min(fitting, key=lambda c: (c.prediction.step_s, len(c.settings.swap or []))) if fitting else None
    final = row("planned", chosen.recompute, chosen.settings) if chosen is not None else None
    return PlanResult(target, link_bps, base.batch, final, rows, min_peak, profiles)


def _per_module(profiles: Dict[str, StepProfile], target: int, link_bps: float, threshold: int,
                profile_spec: Callable[[List[str]], StepProfile], per_kind: List[PlanStrategy],
                disk: Optional[DiskModel] = None) -> PlanStrategy:
    """The per-module row: the greedy search's plan, or a per-kind variant's module set where that is faster."""
    from .recompute import module_entry
    from .recompute_plan import plan_modules

    found = plan_modules(profiles["none"], target, link_bps, threshold, profile_spec,
                         functools.partial(plan_swaps, disk=disk))
    options = []
    if found is not None:
        spec = [module_entry(n) for n in found.modules] or None
        options.append((spec, dataclasses.replace(found.profile, recompute=spec), found.settings, found.prediction))
    for st in per_kind:  # the same wrapping, named module by module
        prof = profiles[variant_key(st.recompute)]
        spec = [module_entry(n) for n in prof.recomputed] or None
        options.append((spec, dataclasses.replace(prof, recompute=spec), st.settings, st.prediction))

    def rank(o: tuple) -> tuple:
        fits = o[3].peak_device_bytes <= target
        return (not fits, o[3].step_s if fits else o[3].peak_device_bytes, len(o[0] or []))

    spec, prof, settings, pred = min(options, key=rank)
    if spec:
        profiles[variant_key(spec)] = prof
    return PlanStrategy(PER_MODULE, spec, settings, pred, pred.peak_device_bytes <= target)


# ------------------------------------------------------------------------------------- largest batch
class BatchSizes:
    """Sizes at any batch from fake runs at batch 1 and 2: every saved tensor of these models is affine
    in the batch (``a + b * batch``); when the two runs do not line up, each batch gets its own fake run."""

    def __init__(self, workload: Workload, recompute: RecomputeSpec, optimizer_bytes: int,
                 step_s_per_sample: float = 0.0) -> None:
        self.workload, self.recompute, self.optimizer_bytes = workload, recompute, optimizer_bytes
        self.step_s_per_sample = step_s_per_sample  # times scale with the batch (FLOPs are linear in it)
        self.one = sizes_profile(workload, 1, recompute, optimizer_bytes)
        self.two = sizes_profile(workload, 2, recompute, optimizer_bytes)
        a, b = self.one.tensors, self.two.tensors
        self.affine = len(a) == len(b) and all(x.module == y.module and x.use_rank == y.use_rank for x, y in zip(a, b))

    def at(self, batch: int) -> StepProfile:
        if not self.affine:
            prof = sizes_profile(self.workload, batch, self.recompute, self.optimizer_bytes)
        else:
            tensors = [dataclasses.replace(y, nbytes=x.nbytes + (y.nbytes - x.nbytes) * (batch - 1))
                       for x, y in zip(self.one.tensors, self.two.tensors)]
            ws = self.one.workspace_bytes + (self.two.workspace_bytes - self.one.workspace_bytes) * (batch - 1)
            prof = dataclasses.replace(self.two, batch=batch, tensors=tensors, workspace_bytes=ws)
        scale = self.step_s_per_sample * batch  # the sizes-only profile spans a nominal 1 s step
        if scale > 0:
            prof.tensors = [dataclasses.replace(t, pack_s=t.pack_s * scale, use_s=t.use_s * scale if t.use_s >= 0
                                                else t.use_s) for t in prof.tensors]
            prof = dataclasses.replace(prof, forward_s=prof.forward_s * scale, backward_s=prof.backward_s * scale)
        return prof

    def peak(self, batch: int, threshold: int, swap_all: bool, link_bps: float) -> int:
        """Device peak at ``batch``: without the engine, or with every candidate swapped."""
        prof = self.at(batch)
        if not swap_all:
            return predict(prof, Settings(threshold, 0, enabled=False), link_bps).peak_device_bytes
        swap = list(range(len(prof.candidates(threshold))))
        return predict(prof, Settings(threshold, 1, swap=swap), link_bps).peak_device_bytes


def max_batch(sizes: BatchSizes, target: int, threshold: int, swap_all: bool, link_bps: float,
              limit: int = 1 << 16) -> int:
    """Largest batch whose predicted peak fits ``target`` (0: not even batch 1): doubling, then bisection."""
    def fits(b: int) -> bool:
        return sizes.peak(b, threshold, swap_all, link_bps) <= target

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------- plan files
def plan_document(result: PlanResult) -> Dict[str, Any]:
    """What ``--write`` stores and ``swap.plan: FILE`` reads: settings plus the per-tensor plan."""
    assert result.chosen is not None and result.profile is not None
    st, prof = result.chosen, result.profile
    cand = prof.candidates(st.settings.threshold)
    # a plan without swaps (no swap / recompute only) still runs under the engine: it applies the
    # recompute and keeps the accounting the prediction is checked against
    planned = dataclasses.replace(st.settings, swap=list(st.settings.swap or []), enabled=True)
    pol = policy_for(planned, prof)
    doc: Dict[str, Any] = {
        "format": PLAN_FORMAT, "batch": result.batch, "memory_target": result.target,
        "predicted_peak_bytes": st.prediction.peak_device_bytes,
        "predicted_peak_saved_bytes": st.prediction.peak_saved_bytes,
        "predicted_step_s": round(st.prediction.step_s, 6), "link_gb_per_s": round(result.link_bps / 1e9, 3),
        "swap": {"enabled": True, "threshold": st.settings.threshold,
                 "prefetch": st.settings.prefetch, "recompute": st.recompute},
        "recompute_modules": list(prof.recomputed),
        "tensors": {"sizes": [prof.tensors[i].nbytes for i in cand], "swap": planned.swap,
                    "order": list(pol.learned_order or [])},
    }
    return doc


def policy_from_document(doc: Dict[str, Any]) -> PlanPolicy:
    """The engine policy for a plan document (from ``plan_document`` or a plan file)."""
    swap, tensors = doc["swap"], doc["tensors"]
    return PlanPolicy(int(swap["threshold"]), int(swap["prefetch"]), tensors["swap"], tensors["sizes"],
                      tensors.get("order") or None)


def to_json(doc: Dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True)


__all__ = ["PlanStrategy", "PlanResult", "plan", "plan_swaps", "policy_for", "max_batch", "BatchSizes", "recompute_label",
           "plan_document", "policy_from_document", "to_json", "PREFETCH_DEPTHS", "PLAN_FORMAT", "PER_MODULE"]
