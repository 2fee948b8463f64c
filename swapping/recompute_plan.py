"""Per-module recompute choice (SuperNeurons): which modules to run again in backward, together with
the swap plan, for a memory target.

Per candidate module (any module called once in forward whose inputs need grad, so its checkpoint
runs), from the base profile alone:

* bytes freed: saved tensors that only modules inside it save (a ReLU's output that the next conv saves
  too stays), less its inputs: an input saved only inside stays held by the checkpoint, one nobody
  saved becomes held;
* recompute time: its forward again (``module_forward_s``: measured per module, or its FLOPs at the
  measured rate);
* left to the modules inside it when they free >= 90 % as much (recomputing a module brings all of its
  saved tensors back at once during its backward: finer segments keep that peak small).

Candidates are taken greedily by recompute seconds per byte freed (ties by name); a module taken after
one inside it replaces it. Each prefix of that order is estimated (tensors removed, recompute time
added) and the swap planner (``planner.plan_swaps``: slack per byte) plans the rest, so recompute is
weighed against the transfer time the swaps would expose (a module slower to recompute than its bytes are to move is
still taken where swapping alone cannot meet the target). The fastest prefix that fits is profiled
exactly (a fake run with those modules wrapped); if the exact profile misses the target the next larger
fitting prefix is tried. Deterministic: sorting keys break ties by name, and no timing is re-taken.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

from .plan_models import Prediction, Settings
from .profile import RecomputeSpec, StepProfile, subtree_bytes

EXACT_TRIES = 3          # exact (fake-run) profiles of the best estimated prefixes
COVERED = 0.9           # a module whose inner candidates free this share of its bytes is left to them
SCAN_POINTS = 24         # prefixes estimated (all of them when there are fewer candidates)


@dataclass(frozen=True)
class Candidate:
    """One module the planner may recompute, with what it frees and what it costs."""

    module: str
    freed_bytes: int
    recompute_s: float
    dropped: FrozenSet[int]   # base tensor indices no longer saved
    held_bytes: int           # inputs nobody saved, now held by the checkpoint
    inner_bytes: int          # its saved tensors, live again while its backward runs


@dataclass
class RecomputeModulePlan:
    modules: List[str]
    profile: StepProfile
    settings: Settings
    prediction: Prediction


def _inside(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def candidates(base: StepProfile, link_bps: float) -> List[Candidate]:
    """Modules worth recomputing, cheapest per byte freed first (ties by name)."""
    out: List[Candidate] = []
    for module, inputs in base.module_inputs.items():
        if not module or not inputs:  # the root, or no input needing grad: the checkpoint would not run
            continue
        inputs_saved = {i for i, _ in inputs if i >= 0}
        # its inputs stay: the checkpoint holds them, whoever saved them
        dropped = frozenset(i for i, t in enumerate(base.tensors) if i not in inputs_saved
                            and t.packers and all(_inside(p, module) for p in t.packers))
        held = sum(n for i, n in inputs if i < 0)
        freed = sum(base.tensors[i].nbytes for i in dropped) - held
        if freed <= 0:
            continue
        cost = base.module_forward_s.get(module, 0.0)
        out.append(Candidate(module, freed, cost, dropped, held, subtree_bytes(base, module)))
    out = [c for c in out if not _covered(c, out)]
    return sorted(out, key=lambda c: (c.recompute_s / c.freed_bytes, c.module))


def _covered(c: Candidate, cands: Sequence[Candidate]) -> bool:
    """Whether the outermost candidates inside ``c`` free (almost) as much as ``c``: then they replace
    it, since recomputing one large module brings all its tensors back at once in backward."""
    inner = [x for x in cands if x.module.startswith(c.module + ".")]
    outermost = [x for x in inner if not any(x.module.startswith(y.module + ".") for y in inner)]
    return sum(x.freed_bytes for x in outermost) >= COVERED * c.freed_bytes


def greedy_sets(cands: Sequence[Candidate]) -> List[List[Candidate]]:
    """The chosen set after each greedy pick: a module inside a chosen one is skipped, one containing
    chosen ones replaces them."""
    chosen: List[Candidate] = []
    sets: List[List[Candidate]] = [[]]
    for c in cands:
        if any(_inside(c.module, x.module) for x in chosen):
            continue
        chosen = [x for x in chosen if not _inside(x.module, c.module)] + [c]
        sets.append(list(chosen))
    return sets


def estimate(base: StepProfile, chosen: Sequence[Candidate], spec: RecomputeSpec) -> StepProfile:
    """The base profile with ``chosen`` recomputed: their tensors gone, their forward added to backward."""
    if not chosen:
        return base
    dropped = frozenset().union(*(c.dropped for c in chosen))
    extra = sum(c.recompute_s for c in chosen)
    scale = (base.backward_s + extra) / max(1e-12, base.backward_s)
    kept = [t for i, t in enumerate(base.tensors) if i not in dropped]
    order = {id(t): r for r, t in enumerate(sorted((t for t in kept if t.use_rank >= 0), key=lambda t: t.use_rank))}
    tensors = [dataclasses.replace(t, use_s=t.use_s * scale if t.use_s >= 0 else t.use_s,
                                   use_rank=order.get(id(t), -1)) for t in kept]
    return dataclasses.replace(base, recompute=spec, tensors=tensors, backward_s=base.backward_s + extra,
                               held_bytes=base.held_bytes + sum(c.held_bytes for c in chosen),
                               recompute_bytes=max(c.inner_bytes for c in chosen),
                               recomputed=[c.module for c in chosen])


def _scan(n: int) -> List[int]:
    if n + 1 <= SCAN_POINTS:
        return list(range(n + 1))
    return sorted({round(i * n / (SCAN_POINTS - 1)) for i in range(SCAN_POINTS)})


def plan_modules(base: StepProfile, target: int, link_bps: float, threshold: int,
                 profile_spec: Callable[[List[str]], StepProfile],
                 plan_swaps: Callable[[StepProfile, int, float, int], Tuple[Settings, Prediction]]
                 ) -> Optional[RecomputeModulePlan]:
    """The fastest fitting module set + swap plan (exactly profiled), else the smallest peak found."""
    from .recompute import module_entry

    sets = greedy_sets(candidates(base, link_bps))
    scored = []
    for k in _scan(len(sets) - 1):
        names = sorted(c.module for c in sets[k])
        est = estimate(base, sets[k], [module_entry(n) for n in names] or None)
        settings, pred = plan_swaps(est, target, link_bps, threshold)
        fits = pred.peak_device_bytes <= target
        scored.append(((not fits, pred.step_s if fits else pred.peak_device_bytes, k), pred.peak_device_bytes, names))
    best: Optional[RecomputeModulePlan] = None
    ranked = [names for _, _, names in sorted(scored)]
    lowest = min(scored, key=lambda r: (r[1], r[0]))[2]
    # the best estimates are profiled exactly; where none of them fits exactly, the prefix with the
    # smallest estimated peak is too, so a target some prefix meets is not given up on a near miss
    tries = ranked[:EXACT_TRIES]
    for i, names in enumerate(tries + [lowest]):
        if best is not None and (best.prediction.peak_device_bytes <= target or (i == len(tries) and lowest in tries)):
            break  # prefixes come best-first: the first exact fit is the pick
        prof = profile_spec([module_entry(n) for n in names]) if names else base
        settings, pred = plan_swaps(prof, target, link_bps, threshold)
        trial = RecomputeModulePlan(names, prof, settings, pred)
        if best is None or _rank(trial, target) < _rank(best, target):
            best = trial
    return best


def _rank(p: RecomputeModulePlan, target: int) -> tuple:
    fits = p.prediction.peak_device_bytes <= target
    return (not fits, p.prediction.step_s if fits else p.prediction.peak_device_bytes, len(p.modules))


__all__ = ["Candidate", "RecomputeModulePlan", "candidates", "greedy_sets", "estimate", "plan_modules"]
