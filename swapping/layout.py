"""The parallel layout planner (Tofu's partitioning, workload-aware parallelization): for each mesh
``{dp: D, tp: T}`` with ``D x T`` = world size and each data-parallel strategy (replicate, shard), one
rank's memory and step time from the profiled step, and the fastest layout that fits the memory target.

Per rank (``layout_profile``): parameters, gradients and optimizer state divided by T for the
TP-split layers and by D for sharded state (plus the gathered weights of two blocks under shard);
saved activations under the swap plan the swap planner makes for that rank's step (TP divides the
split layers' activations). Step time = the swap plan's step (compute, with the split part divided by
T, plus exposed swap traffic) + TP's activation collectives (from the TP plan's bytes) + the DP
reduction of the rank's gradients (all-reduce under replicate; all-gathers and a reduce-scatter under
shard), collectives costed by a ring model over a measured or configured link (``CommRates``).
Fastest = most samples per second (each DP replica runs the configured batch). Pure arithmetic."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .layout_profile import RankState, TPSplit, layout_profile
from .planner import PlanResult, plan
from .profile import StepProfile
from .units import format_size

STRATEGIES = ("replicate", "shard")


@dataclass(frozen=True)
class CommRates:
    """Collectives between ranks, ring model: an op over g ranks on a tensor of n bytes (whole) takes
    ``hops (latency_s + n/g/bandwidth_bps)``, hops 2(g-1) for an all-reduce, g-1 for an all-gather or
    a reduce-scatter. ``ops`` holds measured (op, latency, bandwidth) that replace the defaults per op."""

    latency_s: float
    bandwidth_bps: float
    how: str = "configured"
    ops: Tuple[Tuple[str, float, float], ...] = ()

    def cost(self, op: str, nbytes: float, ranks: int, count: int = 1) -> float:
        """Seconds of ``count`` collectives ``op`` moving ``nbytes`` (whole) in all over ``ranks``."""
        if ranks <= 1:
            return 0.0
        latency, bandwidth = next(((lat, bw) for name, lat, bw in self.ops if name == op),
                                  (self.latency_s, self.bandwidth_bps))
        hops = (2 if op == "allreduce" else 1) * (ranks - 1)
        return hops * (count * latency + nbytes / ranks / bandwidth)

    def allreduce_s(self, nbytes: float, ranks: int, count: int = 1) -> float:
        return self.cost("allreduce", nbytes, ranks, count)

    @classmethod
    def measured(cls, ops: Tuple[Tuple[str, float, float], ...], how: str) -> "CommRates":
        """Rates from measured ops (the all-reduce's are the defaults for any op not measured)."""
        latency, bandwidth = next(((lat, bw) for name, lat, bw in ops if name == "allreduce"), (ops[0][1], ops[0][2]))
        return cls(latency, bandwidth, how, tuple(ops))


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    strategy: str

    @property
    def name(self) -> str:
        return f"dp {self.dp} x tp {self.tp} {self.strategy}"


@dataclass(frozen=True)
class ModelFacts:
    """What the layout model needs beyond the profile: the shard units' count and largest size (FSDP
    gathers one unit at a time, two with prefetch) and the TP split per candidate degree."""

    shard_units: int
    largest_unit_bytes: int
    splits: Dict[int, TPSplit]          # tp degree -> its split (absent: not a valid degree)
    refused: Dict[int, str] = field(default_factory=dict)   # tp degree -> why not (the TP plan's one line)


@dataclass
class LayoutEstimate:
    layout: Layout
    peak_bytes: int
    step_s: float
    compute_s: float
    swap_exposed_s: float
    tp_comm_s: float
    dp_comm_s: float
    samples_per_s: float
    fits: bool
    held_bytes: int = 0          # parameters + gradients + optimizer state this rank keeps across steps
    saved_bytes: int = 0         # the swap engine's peak of saved activations resident (its accounting)
    swap: Optional[PlanResult] = None
    why: str = ""


def meshes(world: int) -> List[tuple]:
    """Every (dp, tp) with dp x tp = world, pure data parallel first."""
    return [(world // t, t) for t in range(1, world + 1) if world % t == 0]


def rank_state(profile: StepProfile, layout: Layout, split: TPSplit, facts: ModelFacts,
               gathered: bool = True) -> RankState:
    """Parameter, gradient and optimizer bytes one rank holds under ``layout`` (``gathered``: with the
    whole units FSDP2 gathers for compute, the peak; without: what it keeps across steps)."""
    total = max(1, profile.param_bytes)
    tp_params = total - split.split_param_bytes + split.split_param_bytes // max(1, layout.tp)
    share = tp_params / total
    grads = int(profile.grad_bytes * share)
    optim = int(profile.optimizer_bytes * share)
    if layout.strategy != "shard":
        return RankState(tp_params, grads, optim)
    unit = int(facts.largest_unit_bytes * share) if gathered else 0  # gathered for compute: this unit and the prefetched next
    return RankState(tp_params // layout.dp + 2 * unit, grads // layout.dp + unit, optim // layout.dp)


def estimate(profiles: Dict[str, StepProfile], layout: Layout, facts: ModelFacts, target: int, link_bps: float,
             threshold: int, rates: CommRates, compute_scale: float = 1.0) -> LayoutEstimate:
    """One layout: the swap planner on the rank's step, plus the collectives the layout adds."""
    split = facts.splits[layout.tp]
    base = profiles["none"]
    state = rank_state(base, layout, split, facts)
    ranked = {key: layout_profile(prof, split, state, compute_scale) for key, prof in profiles.items()}
    result = plan(ranked, target, link_bps, threshold)
    total = max(1, base.param_bytes)
    tp_params = total - split.split_param_bytes + split.split_param_bytes // layout.tp
    tp_s = sum(rates.cost(op, n, layout.tp) for op, n in split.collectives)
    if layout.strategy == "shard":  # all-gather in forward and again in backward, one reduce-scatter of grads
        dp_s = (2 * rates.cost("allgather", tp_params, layout.dp, facts.shard_units)
                + rates.cost("reduce_scatter", base.grad_bytes * tp_params / total, layout.dp, facts.shard_units))
    else:
        dp_s = rates.allreduce_s(base.grad_bytes * tp_params / total, layout.dp)
    chosen = result.chosen
    if chosen is not None:
        pred = chosen.prediction
        peak, compute, exposed, saved = pred.peak_device_bytes, pred.compute_s, pred.exposed_s, pred.peak_saved_bytes
    else:
        peak = result.min_peak
        prof = ranked["none"]
        compute, exposed = prof.forward_s + prof.backward_s, 0.0
        saved = sum(t.nbytes for t in prof.tensors if t.nbytes >= threshold)
    step = compute + exposed + tp_s + dp_s
    held = rank_state(base, layout, split, facts, gathered=False)
    return LayoutEstimate(layout, peak, step, compute, exposed, tp_s, dp_s, layout.dp * base.batch / step,
                          chosen is not None, held.param_bytes + held.grad_bytes + held.optimizer_bytes, saved,
                          result)


def refusal(layout: Layout, facts: ModelFacts, backend: str) -> str:
    """Why a layout cannot run at all (empty: it can)."""
    if layout.tp > 1 and layout.tp not in facts.splits:
        why = facts.refused.get(layout.tp, f"tp {layout.tp} does not divide the model's split dimensions")
        return why.split("comm.mesh.tp: ", 1)[-1]
    if layout.tp > 1 and backend == "horovod":
        return "horovod has no tensor parallel (comm.backend: torch)"
    if layout.strategy == "shard" and backend == "horovod":
        return "horovod has no sharding (comm.backend: torch)"
    if layout.strategy == "shard" and layout.dp < 2:
        return "shard needs dp >= 2"
    return ""


@dataclass
class LayoutChoice:
    """The table: every candidate estimated (or refused, with why) and the pick (None: none fits)."""

    estimates: List[LayoutEstimate]
    refused: List[tuple]               # (layout, why)
    chosen: Optional[LayoutEstimate]
    target: int
    rates: CommRates
    world: int


def choose(profiles: Dict[str, StepProfile], world: int, facts: ModelFacts, target: int, link_bps: float,
           threshold: int, rates: CommRates, backend: str = "torch", compute_scale: float = 1.0) -> LayoutChoice:
    """Estimate every layout of ``world`` ranks and pick the one with the most samples per second that
    fits ``target`` (ties: less tensor parallel, replicate before shard)."""
    estimates, refused = [], []
    for dp, tp in meshes(world):
        for strategy in STRATEGIES:
            layout = Layout(dp, tp, strategy)
            why = refusal(layout, facts, backend)
            if why:
                refused.append((layout, why))
                continue
            estimates.append(estimate(profiles, layout, facts, target, link_bps, threshold, rates, compute_scale))
    fitting = [e for e in estimates if e.fits]
    chosen = max(fitting, key=lambda e: (e.samples_per_s, -e.layout.tp, e.layout.strategy == "replicate"),
                 default=None)
    for e in estimates:
        e.why = _why(e, chosen, target)
    return LayoutChoice(estimates, refused, chosen, target, rates, world)


def _why(e: LayoutEstimate, chosen: Optional[LayoutEstimate], target: int) -> str:
    if not e.fits:
        return f"does not fit: lowest peak {format_size(e.peak_bytes)} > {format_size(target)}"
    parts = [f"{k} {v * 1e3:.1f} ms" for k, v in (("compute", e.compute_s), ("swap", e.swap_exposed_s),
                                                  ("tp", e.tp_comm_s), ("dp", e.dp_comm_s)) if v >= 5e-5]
    costs = " + ".join(parts)
    if e is chosen:
        return f"picked: the most samples/s that fits ({costs})"
    assert chosen is not None
    slower = 1 - e.samples_per_s / chosen.samples_per_s
    return f"fits, {slower:.0%} fewer samples/s than the pick ({costs})"


__all__ = ["CommRates", "Layout", "ModelFacts", "LayoutEstimate", "LayoutChoice", "STRATEGIES", "meshes",
           "rank_state", "estimate", "refusal", "choose"]

