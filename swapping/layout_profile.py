"""One rank's step under a parallel layout, as a ``StepProfile`` the swap planner can plan: the
profiled single-rank step with tensor parallelism's division applied (saved activations and compute
of the split regions divided by the TP degree) and the rank's own parameter, gradient and optimizer
bytes (divided by TP for the split layers, by DP for sharded state).

The division follows Megatron's rules on the profile's own records: inside a split region (an
attention block split by heads, an MLP split column-then-row) every saved tensor is the rank's
local part (1/T) except the input a column-parallel module saves, which stays whole on every rank
(the replicated activation its weight gradient needs). Compute between two packs (forward) or two
first uses (backward) belongs to the module of the earlier one (autograd saves an op's inputs
before it runs), so a split region's compute is divided by T where it happens and the timeline the
swap planner replays keeps its shape.
Pure arithmetic on the profile: no torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .profile import SavedTensor, StepProfile


@dataclass(frozen=True)
class TPSplit:
    """What tensor parallelism of degree ``tp`` does to one step, in the profile's module names
    (built from the TP plan by the launcher; ``tp == 1``: nothing is split)."""

    tp: int = 1
    regions: Tuple[str, ...] = ()          # modules whose saved activations are this rank's part (1/tp)
    whole_inputs: Tuple[str, ...] = ()     # column-parallel modules: the input they save stays whole
    split_compute: Tuple[str, ...] = ()    # modules whose compute divides by tp (regions + split modules)
    split_param_bytes: int = 0             # parameter bytes the tp ranks divide (a rank keeps 1/tp)
    collectives: Tuple[Tuple[str, int], ...] = ()  # (allreduce | allgather | reduce_scatter, whole bytes)
                                                   # per step over the tp group, forward and backward

    def divided(self, module: str) -> bool:
        """Whether a tensor packed by ``module`` is split across the tp ranks."""
        if self.tp <= 1 or module in self.whole_inputs:
            return False
        return _under(module, self.regions)

    def compute_divided(self, module: str) -> bool:
        """Whether the compute attributed to ``module`` runs on 1/tp of the work per rank."""
        return self.tp > 1 and _under(module, self.split_compute)


def _under(module: str, names: Tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in names)


@dataclass(frozen=True)
class RankState:
    """Bytes one rank holds across steps: parameters (with any gathered for compute), gradients,
    optimizer state."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


def _retimed(events: Sequence[Tuple[int, float]], scale: Dict[int, float], lead: float,
             end: float) -> Tuple[Dict[int, float], float]:
    """Event times (and the phase's end) with each gap scaled by the factor of the event that opens it:
    autograd saves an op's inputs before the op runs and reads them before the op's backward runs, so
    the compute after an event is its module's (the gap before the first event scales by ``lead``)."""
    out: Dict[int, float] = {}
    new, last, factor = 0.0, 0.0, lead
    for i, t in sorted(events, key=lambda x: (x[1], x[0])):
        new += max(0.0, t - last) * factor
        last, factor = max(last, t), scale[i]
        out[i] = new
    return out, new + max(0.0, end - last) * factor


def layout_profile(profile: StepProfile, split: TPSplit, state: RankState,
                   compute_scale: float = 1.0) -> StepProfile:
    """``profile`` as one rank of a layout sees it: split tensors and compute divided by ``split.tp``,
    the rank's ``state`` bytes, every time multiplied by ``compute_scale`` (ranks sharing a device's
    cores run slower than the profiled step)."""
    tp = max(1, split.tp)
    factor = {i: (1.0 / tp if split.compute_divided(t.module) else 1.0) * compute_scale
              for i, t in enumerate(profile.tensors)}
    packs, forward = _retimed([(i, t.pack_s) for i, t in enumerate(profile.tensors)], factor, compute_scale,
                              profile.forward_s)
    uses, backward = _retimed([(i, t.use_s) for i, t in enumerate(profile.tensors) if t.use_rank >= 0], factor,
                              compute_scale, profile.backward_s)
    # the timeline gives each gap to the module of the event opening it, which misplaces compute where a
    # region has no events of its own (a recomputed block saves only its input; an unsplit LM head runs
    # after the last block's pack): the FLOPs say how much of the step divides, and the timeline keeps
    # its shape scaled to that total
    expected = compute_scale * (1 - split_flops_fraction(profile, split) * (1 - 1 / tp))
    measured = (forward + backward) / max(1e-12, profile.forward_s + profile.backward_s)
    if tp > 1 and profile.module_forward_flops.get("") and abs(measured / expected - 1) > 1e-3:
        fix = expected / measured
        packs, uses = {i: v * fix for i, v in packs.items()}, {i: v * fix for i, v in uses.items()}
        forward, backward = forward * fix, backward * fix
    tensors: List[SavedTensor] = []
    for i, t in enumerate(profile.tensors):
        nbytes = -(-t.nbytes // tp) if split.divided(t.module) else t.nbytes
        tensors.append(dataclasses.replace(t, nbytes=nbytes, pack_s=packs[i],
                                           use_s=uses[i] if t.use_rank >= 0 else t.use_s))
    outer = _outermost(split.split_compute)
    per_module = {m: v * compute_scale * _module_factor(profile, split, outer, m)
                  for m, v in profile.module_forward_s.items()}  # what recomputing a module costs here
    return dataclasses.replace(profile, tensors=tensors, forward_s=forward, backward_s=backward,
                               module_forward_s=per_module,
                               param_bytes=state.param_bytes, grad_bytes=state.grad_bytes,
                               optimizer_bytes=state.optimizer_bytes)


def _outermost(names: Tuple[str, ...]) -> List[str]:
    return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def split_flops_fraction(profile: StepProfile, split: TPSplit) -> float:
    """The share of the step's compute inside the modules whose compute tp divides (outermost names
    only: a region's FLOPs include its modules'), from forward FLOPs: backward runs the same modules'
    matmuls at about twice the forward's, while the counter's backward attribution to modules is not
    to be trusted (under checkpointing it charges backward ops to modules still on its stack)."""
    forward = profile.module_forward_flops
    if split.tp <= 1 or not forward.get(""):
        return 0.0
    return min(1.0, sum(forward.get(n, 0) for n in _outermost(split.split_compute)) / forward[""])


def _module_factor(profile: StepProfile, split: TPSplit, outer: List[str], module: str) -> float:
    """How much of ``module``'s forward one tp rank runs: 1/tp inside a split region, else its share of
    forward FLOPs outside the split modules it contains (a block: its norms stay whole)."""
    if split.tp <= 1:
        return 1.0
    if split.compute_divided(module):
        return 1.0 / split.tp
    flops = profile.module_forward_flops
    total = flops.get(module, 0)
    inner = sum(flops.get(n, 0) for n in outer if n.startswith(module + ".") or not module)
    return 1.0 - (min(1.0, inner / total) if total else 0.0) * (1 - 1 / split.tp)


__all__ = ["TPSplit", "RankState", "layout_profile", "split_flops_fraction"]
