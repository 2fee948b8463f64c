"""The machine's rates the planner's time model needs, measured: matmul FLOP/s and one direction of
the swap link (pinned device<->host copies on CUDA, a host copy on CPU)."""
from __future__ import annotations

import time
from typing import Union

import torch


def device_flops(device: torch.device) -> float:
    """Achieved matmul FLOP/s on ``device`` (a 1024^2 product, median of 5)."""
    a = torch.randn(1024, 1024, device=device)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / sorted(times)[2]


def link_bandwidth(device: Union[str, torch.device]) -> float:
    """Bytes/s of one direction of the swap link: pinned device<->host copies on CUDA, a host copy
    (what the loopback transport does) on CPU. Median of 5 copies of 64 MiB."""
    device = torch.device(device)
    n = 64 << 20
    if device.type == "cuda":
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    else:
        src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[2]
