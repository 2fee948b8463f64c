"""How fast collectives run between ranks, measured: all-reduce times at a small and a large size
(latency, then bandwidth), for the layout planner's ring model.

At job start the job's own backend is timed over every rank (``time_allreduce``); offline (``lmsrun
plan`` on one machine) ``measure_local`` starts ``ranks`` processes on this host with a gloo group
on loopback, as a one-host CPU job runs (several hosts: pass the link's rate instead)."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Sequence, Tuple

import torch

SIZES = (4 << 10, 4 << 20)   # bytes: latency-bound, bandwidth-bound
REPS = 5


def time_allreduce(allreduce: Callable[[torch.Tensor], object], sizes: Sequence[int] = SIZES,
                   reps: int = REPS) -> Dict[int, float]:
    """Median seconds of ``allreduce`` (a blocking all-reduce of one float32 tensor) per size in bytes,
    after one warm-up each. Every rank must call it with the same arguments."""
    out: Dict[int, float] = {}
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4))
        allreduce(t)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            allreduce(t)
            times.append(time.perf_counter() - t0)
        out[nbytes] = statistics.median(times)
    return out


def fit(ranks: int, times: Dict[int, float]) -> Tuple[float, float]:
    """(latency s per hop, bandwidth bytes/s) of the ring model ``2(g-1)(latency + n/g/bandwidth)``
    from all-reduce times at two sizes."""
    (small, t_small), (big, t_big) = sorted(times.items())[0], sorted(times.items())[-1]
    hops = 2 * (ranks - 1)
    per_byte = max(1e-15, (t_big - t_small) / hops / max(1.0, (big - small) / ranks))
    latency = max(0.0, t_small / hops - small / ranks * per_byte)
    return latency, 1.0 / per_byte


def _child(rank: int, ranks: int, init: str, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ranks)
    try:
        times = time_allreduce(lambda t: dist.all_reduce(t))
        if rank == 0:
            with open(result, "w", encoding="utf-8") as handle:
                json.dump({str(k): v for k, v in times.items()}, handle)
    finally:
        dist.destroy_process_group()


def measure_local(ranks: int, timeout_s: float = 120.0) -> Tuple[float, float]:
    """(latency, bandwidth) of all-reduces among ``ranks`` processes on this host (gloo, loopback)."""
    ranks = max(2, ranks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "times.json")
        procs = [subprocess.Popen([sys.executable, "-m", __name__, str(r), str(ranks), f"tcp://127.0.0.1:{port}",
                                   result], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for r in range(ranks)]
        errors = [p.communicate(timeout=timeout_s)[1] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("measuring all-reduce rates failed: "
                               + next(e for p, e in zip(procs, errors) if p.returncode).decode()[-300:])
        with open(result, encoding="utf-8") as handle:
            times = {int(k): v for k, v in json.load(handle).items()}
    return fit(ranks, times)


if __name__ == "__main__":  # one rank of measure_local
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])


__all__ = ["time_allreduce", "fit", "measure_local", "SIZES"]
