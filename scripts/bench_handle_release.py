#!/usr/bin/env python3
"""What freeing a saved tensor costs the swap engine when nothing records the memory timeline:
``SwapEngine.handle_released`` as it is (no lock unless recording) against the earlier version (the engine lock
for every candidate tensor), side by side in one process, modes alternating every repetition,
medians. Workloads with many small saved tensors kept resident (a large budget: the release path
without any swap traffic) and a swap-everything step (loopback on CPU).

    python scripts/bench_handle_release.py [--reps 41]   # table: workload, ms/step before / now, ratio;
                                                         # last row: ns per released handle
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, List

import torch
from torch import nn

from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.handles import Handle

warnings.filterwarnings("ignore", message="lmsdp swap")
NOW_DEL = SwapEngine.handle_released


def locked_del(eng: SwapEngine, h: Handle) -> None:
    """The release path before the change: the lock taken whether or not anything records."""
    if h.host is not None:
        out_tr, in_tr = h.out_tr, h.in_tr
        eng.pool.release(h.host, lambda: out_tr.done() and (in_tr is None or in_tr.done()))
    if h.tensor is not None or h.in_tensor is not None:
        with eng._lock:
            eng._held_change(-h.nbytes)
    eng._live -= 1


MODES: Dict[str, Callable] = {"locked (before)": locked_del, "unlocked (now)": NOW_DEL}


def step_times(config: SwapConfig, layers: int, width: int, batch: int, reps: int) -> Dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)])
    x = torch.randn(batch, width)
    engine = SwapEngine(config, "cpu")
    assert not engine.record_memory
    times: Dict[str, List[float]] = {name: [] for name in MODES}
    try:
        for rep in range(reps + 3):
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
            for name in order:
                SwapEngine.handle_released = MODES[name]
                t0 = time.perf_counter()
                with engine:
                    loss = model(x).square().mean()
                loss.backward()
                engine.step_end()
                if rep >= 3:
                    times[name].append(time.perf_counter() - t0)
    finally:
        SwapEngine.handle_released = NOW_DEL
        engine.close()
    return {name: statistics.median(v) for name, v in times.items()}


def release_ns(calls: int = 20_000, reps: int = 21) -> Dict[str, float]:
    """ns per freed resident handle (median of ``reps``, modes alternating): the release alone."""
    engine = SwapEngine(SwapConfig(enabled=True, threshold=0, transport="loopback"), "cpu")
    t = torch.zeros(16)
    times: Dict[str, List[float]] = {name: [] for name in MODES}
    try:
        for rep in range(reps):
            for name in (list(MODES) if rep % 2 == 0 else list(reversed(MODES))):
                SwapEngine.handle_released = MODES[name]
                handles = [Handle(engine, i, 0, t, 0, 64) for i in range(calls)]
                engine._live += calls  # the engine counts the handles it creates
                t0 = time.perf_counter()
                handles.clear()
                times[name].append((time.perf_counter() - t0) / calls * 1e9)
    finally:
        SwapEngine.handle_released = NOW_DEL
        engine.close()
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [
        ("200 small layers, all resident", SwapConfig(enabled=True, threshold=0, budget="64GiB", transport="loopback"),
         200, 64, 8),
        ("200 small layers, swap all", SwapConfig(enabled=True, threshold=0, budget=0, keep_last=0, prefetch=2,
                                                  transport="loopback"), 200, 64, 8),
        ("12 wide layers, all resident", SwapConfig(enabled=True, threshold=0, budget="64GiB", transport="loopback"),
         12, 1024, 64),
    ]
    print(f"{'workload':34} {'before ms':>10} {'now ms':>10} {'now/before':>11}")
    for label, config, layers, width, batch in cases:
        t = step_times(config, layers, width, batch, args.reps)
        before, now = t["locked (before)"], t["unlocked (now)"]
        print(f"{label:34} {before * 1e3:10.3f} {now * 1e3:10.3f} {now / before:11.3f}")
    ns = release_ns()
    before, now = ns["locked (before)"], ns["unlocked (now)"]
    print(f"{'one release, ns':34} {before:10.1f} {now:10.1f} {now / before:11.3f}")


if __name__ == "__main__":
    main()
