"""Swap policies: what the engine swaps, what it prefetches next, and what it learns at step end.

The engine (``engine.py``) is the mechanism: hooks, handles, transfers, pool and accounting. A policy
holds every decision, so the rules can change without touching the copy paths:

* ``threshold``: saved tensors below it leave the pack hook after one size check (the fast path);
* ``on_pack(h)``: called once per new candidate handle; calls ``engine.swap_out(handle)`` for each
  handle it wants moved now (the new one or an older one it held back);
* ``forward_length`` / ``prefetch_candidates(seq)``: when forward is over, and which handles to bring
  back after the first use of ``seq`` (``None``: at forward end); the engine starts up to ``prefetch``;
* ``step_end(order, handles)``: learn from the step's first-use order.

Two policies exist: ``threshold`` (the size / budget / keep_last rules configured by hand) and
``plan`` (a per-tensor keep/swap decision made by ``swapping.planner`` for a memory target).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Protocol, Sequence

from .handles import Handle

_PREFETCH_SCAN = 256  # learned-order entries scanned per unpack looking for handles to prefetch


class SwapTarget(Protocol):
    """The engine as a policy sees it: the saved bytes it budgets against and the one action it takes.
    (A protocol, not the engine class: the engine imports the policy, never the other way round.)"""

    @property
    def resident_saved_bytes(self) -> int: ...

    def swap_out(self, h: Handle) -> None: ...


class SwapPolicy:
    """Base policy: never swaps; prefetches in the learned first-use order (Capuchin), reverse pack
    order before anything is learned."""

    name = "base"

    def __init__(self, threshold: int, prefetch: int, learned_order: Optional[Sequence[int]] = None,
                 forward_length: int = -1) -> None:
        self.threshold = max(0, int(threshold))
        self.prefetch = max(0, int(prefetch))
        self.engine: Optional[SwapTarget] = None
        self.learned_order: Optional[List[int]] = None
        self._learned_pos: Dict[int, int] = {}
        self.forward_length = -1  # handles per forward once learned: reaching it means forward ended
        if learned_order:
            self._learn(list(learned_order), forward_length)

    def bind(self, engine: SwapTarget) -> None:
        self.engine = engine

    # ---------------------------------------------------------------------------------- decisions
    def begin_step(self) -> None:
        """A new step's first candidate is about to be packed."""

    def on_pack(self, h: Handle) -> None:
        """A new candidate handle ``h`` (``h.seq`` = its index this step, ``h.nbytes`` its size)."""

    def tier(self, h: Handle) -> str:
        """The storage tier swapped ``h`` goes to: ``host`` (the host pool while ``swap.host_limit`` has room,
        then the disk tier below when there is one) or ``disk`` (straight to the disk tier)."""
        return "host"

    def backward_begins(self) -> None:
        """The first saved tensor of this step was unpacked."""

    def prefetch_candidates(self, seq: Optional[int]) -> Iterable[int]:
        """Handles (by seq) worth bringing back after the first use of ``seq``; None = forward ended."""
        learned = self.learned_order
        if learned is not None and (seq is None or seq in self._learned_pos):
            start = 0 if seq is None else self._learned_pos[seq] + 1
            return learned[start:start + _PREFETCH_SCAN]
        if seq is None:
            return ()
        return range(seq - 1, max(-1, seq - 1 - _PREFETCH_SCAN), -1)

    def step_end(self, order: List[int], handles: int) -> None:
        """Learn the first-use order of this step when it is new (first step, or the graph changed)."""
        if order and (self.learned_order is None or handles != self.forward_length):
            self._learn(list(order), handles)

    def _learn(self, order: List[int], handles: int) -> None:
        self.learned_order = order
        self._learned_pos = {}
        for i, s in enumerate(order):
            self._learned_pos.setdefault(s, i)
        self.forward_length = handles

    def describe(self) -> str:
        return self.name


class ThresholdPolicy(SwapPolicy):
    """The hand-tuned rules: every candidate (>= ``threshold`` bytes) except the last ``keep_last`` of
    forward is swapped, once it leaves the keep_last window, while resident saved bytes exceed ``budget``."""

    name = "threshold"

    def __init__(self, threshold: int, prefetch: int, keep_last: int, budget: int) -> None:
        super().__init__(threshold, prefetch)
        self.keep_last = max(0, int(keep_last))
        self.budget = max(0, int(budget))
        self._pending: Deque[Handle] = deque()

    def begin_step(self) -> None:
        self._pending.clear()

    def on_pack(self, h: Handle) -> None:
        engine = self.engine
        assert engine is not None
        self._pending.append(h)
        while len(self._pending) > self.keep_last:
            old = self._pending.popleft()
            if engine.resident_saved_bytes > self.budget and old.tensor is not None:
                engine.swap_out(old)

    def backward_begins(self) -> None:
        self._pending.clear()  # keep_last tensors stay resident; do not pin them past their use

    def describe(self) -> str:
        return f"threshold (threshold={self.threshold}, keep_last={self.keep_last}, budget={self.budget})"


class PlanPolicy(SwapPolicy):
    """A planner's per-tensor decision: candidate ``seq`` is swapped at pack when the plan says so and
    its size is the planned one (a graph that no longer matches the plan keeps what it does not know).
    The planned first-use order is known before step 1, so even step 1 prefetches in the right order."""

    name = "plan"

    def __init__(self, threshold: int, prefetch: int, swap: Sequence[int], sizes: Sequence[int],
                 order: Optional[Sequence[int]] = None) -> None:
        super().__init__(threshold, prefetch, order, len(sizes) if order else -1)
        self.sizes = list(sizes)
        self.swap = frozenset(int(s) for s in swap)
        self.mismatches = 0  # candidates whose size differed from the plan (kept on the device)

    def on_pack(self, h: Handle) -> None:
        seq = h.seq
        if seq >= len(self.sizes) or self.sizes[seq] != h.nbytes:
            self.mismatches += 1
            return
        if seq in self.swap:
            assert self.engine is not None
            self.engine.swap_out(h)

    def describe(self) -> str:
        return f"plan (swap {len(self.swap)} of {len(self.sizes)} saved tensors, prefetch={self.prefetch})"


def threshold_policy(config: Any) -> ThresholdPolicy:
    """Today's rules from a ``SwapConfig``."""
    from .units import parse_size

    return ThresholdPolicy(parse_size(config.threshold) or 0, int(config.prefetch), int(config.keep_last),
                           parse_size(config.budget) or 0)
