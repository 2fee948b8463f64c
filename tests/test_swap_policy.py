"""The engine's policy seam: the default is today's threshold rules, a PlanPolicy swaps exactly its plan
(and prefetches in its order from step 1), a size that no longer matches the plan is kept, and a policy
written against the interface alone drives the engine with bit-exact gradients."""
from __future__ import annotations

from typing import List, Optional

import pytest
import torch

from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.policy import PlanPolicy, SwapPolicy, ThresholdPolicy

from .test_swap_behaviour import chain

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")
GROUPS = [[1024, 1024, 1024], [1024, 1024, 1024]]  # unpack order 3, 4, 5, 0, 1, 2 (see test_swap_behaviour)


def make(policy: Optional[SwapPolicy] = None, **kw: object) -> SwapEngine:
    cfg = dict(enabled=True, threshold=0, prefetch=2, keep_last=0, budget=0, transport="loopback")
    cfg.update(kw)
    return SwapEngine(SwapConfig(**cfg), "cpu", policy=policy)  # type: ignore[arg-type]


def step(e: SwapEngine, groups=GROUPS) -> dict:
    with e:
        loss = chain(groups)
    loss.backward()
    return e.step_end()


def test_default_policy_is_the_configured_threshold_rules() -> None:
    e = make(threshold=4096, keep_last=2, budget=8192, prefetch=3)
    try:
        assert isinstance(e.policy, ThresholdPolicy)
        p = e.policy
        assert (p.threshold, p.keep_last, p.budget, p.prefetch) == (4096, 2, 8192, 3)
    finally:
        e.close()


def test_plan_policy_swaps_exactly_the_plan_and_prefetches_in_its_order_from_step_1() -> None:
    sizes = [4096] * 6
    plan = PlanPolicy(threshold=0, prefetch=2, swap=[0, 2, 3], sizes=sizes, order=[3, 4, 5, 0, 1, 2])
    e = make(plan)
    try:
        for _ in range(2):
            s = step(e)
            assert sorted(e.last_swapped) == [0, 2, 3]
            assert s["stalls"] == 0 and s["swap_in_tensors"] == 3
            assert e.last_prefetch_order == [3, 0, 2]
            assert s["peak_saved_bytes"] == 3 * 4096  # kept 1, 4, 5 plus each swapped one while it is packed
    finally:
        e.close()
    threshold = make(prefetch=2)  # the learned-order policy stalls on step 1 for the same graph
    try:
        assert step(threshold)["stalls"] == 4  # it guesses reverse pack order: 3, 4, 5 and 0 stall
    finally:
        threshold.close()


def test_plan_policy_keeps_tensors_whose_size_differs_from_the_plan() -> None:
    plan = PlanPolicy(threshold=0, prefetch=1, swap=[0, 1, 2, 3, 4, 5], sizes=[4096, 8, 4096, 4096, 8, 4096])
    e = make(plan)
    try:
        step(e)
        assert sorted(e.last_swapped) == [0, 2, 3, 5] and plan.mismatches == 2
    finally:
        e.close()


class EveryOther(SwapPolicy):
    """A policy written against the interface only: swap odd seqs, prefetch in reverse pack order."""

    name = "every-other"

    def __init__(self) -> None:
        super().__init__(threshold=0, prefetch=1)
        self.learned: List[List[int]] = []

    def on_pack(self, h) -> None:  # type: ignore[no-untyped-def]
        if h.seq % 2:
            self.engine.swap_out(h)  # type: ignore[union-attr]

    def step_end(self, order: List[int], handles: int) -> None:
        self.learned.append(list(order))


def test_a_custom_policy_drives_the_engine_bit_exactly() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.LayerNorm(128), torch.nn.Linear(128, 8))
    x = torch.randn(32, 64)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    policy = EveryOther()
    e = make(policy)
    try:
        with e:
            loss = model(x).square().sum()
        loss.backward()
        s = e.step_end()
        assert s["swapped_tensors"] > 0 and all(seq % 2 for seq in e.last_swapped)
        assert policy.learned and policy.learned[0] == e.last_unpack_order
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want))
    finally:
        e.close()
