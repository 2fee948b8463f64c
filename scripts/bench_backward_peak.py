#!/usr/bin/env python3
"""Saved activations the swap engine holds on the device, forward peak vs backward peak, per prefetch
depth: what the sliding prefetch window bounds. Accounting of the engine itself (loopback transport on
CPU: the bytes the engine would keep on a GPU), not device memory; the GPU figure needs a device.

    python scripts/bench_backward_peak.py          # table: model, prefetch, fwd / bwd peak MiB, swapped MiB
"""
from __future__ import annotations

import time
import warnings

import torch

from lmsdp.launcher.models import build_model
from lmsdp.swapping import SwapConfig, SwapEngine

warnings.filterwarnings("ignore", message="lmsdp swap")
MiB = float(1 << 20)


def measure(name: str, kwargs: dict, batch: torch.Tensor, prefetch: int) -> tuple:
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=4096, budget=0, prefetch=prefetch, keep_last=1), "cpu")
    engine.record_memory = True  # the memory timeline of every step, no trace file
    try:
        for _ in range(3):  # step 1 learns the order; the last step is measured
            with engine:
                out = model(batch)
            t_backward = time.perf_counter()
            out.float().sum().backward()
            stats = engine.step_end()
        timeline = engine.last_memory_timeline
        forward = max((h for t, h in timeline if t < t_backward), default=0)
        backward = max((h for t, h in timeline if t >= t_backward), default=0)
        return forward / MiB, backward / MiB, stats["swap_out_bytes"] / MiB, stats["stalls"]
    finally:
        engine.close()


def main() -> None:
    cases = [("resnet18", {}, torch.randn(16, 3, 32, 32)),
             ("gpt", {"layers": 4, "width": 128, "seq_len": 128}, torch.randint(0, 100, (8, 128)))]
    print("| model | prefetch | forward peak MiB | backward peak MiB | swapped per step MiB | stalls |")
    print("|---|---|---|---|---|---|")
    for name, kwargs, batch in cases:
        for prefetch in (1, 2, 4):
            fwd, bwd, swapped, stalls = measure(name, kwargs, batch, prefetch)
            print(f"| {name} | {prefetch} | {fwd:.2f} | {bwd:.2f} | {swapped:.2f} | {stalls} |")


if __name__ == "__main__":
    main()
