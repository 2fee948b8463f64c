"""The machine's rates the planner's time model needs, measured: matmul FLOP/s and one direction of
the swap link (pinned device<->host copies on CUDA, a host copy on CPU) and the disk tier's write and read."""
from __future__ import annotations

import time
from typing import Tuple, Union

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


def disk_bandwidth(folder: str, nbytes: int = 64 << 20) -> Tuple[float, float]:
    """(write, read) bytes/s of the disk tier in ``folder``: one ``nbytes`` tensor spilled and read
    back through the tier's own path (worker thread, O_DIRECT where allowed), in a throw-away rank
    folder. A short probe, like ``link_bandwidth``: a first figure for the planner, not a benchmark."""
    from .disk import ALIGN, DiskTier
    from .pool import aligned_empty

    tier = DiskTier(folder, None, False, workers=1)
    try:
        buf = aligned_empty(nbytes, ALIGN).fill_(7)
        t0 = time.perf_counter()
        sp = tier.spill(buf, nbytes, lambda: None, lambda: None)
        sp.written.wait()
        write_s = time.perf_counter() - t0
        tier.check()
        t0 = time.perf_counter()
        tier.read_ahead(sp, buf)
        tier.fetch(sp)
        read_s = time.perf_counter() - t0
    finally:
        tier.close()
    return nbytes / max(write_s, 1e-9), nbytes / max(read_s, 1e-9)
