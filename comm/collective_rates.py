"""How fast collectives run between ranks, measured: all-reduce, all-gather and reduce-scatter times
at a small and a large size (latency, then bandwidth) for the layout planner's ring model.

At job start the job's own process group is timed over every rank (``time_collectives``; a backend
without one times its all-reduce: ``time_allreduce``); offline (``lmsrun plan`` on one machine)
``measure_local`` starts ``ranks`` processes on this host with a gloo group on loopback, as a one-host
CPU job runs (several hosts: pass the link's rate instead). Each op is fitted on its own: gloo's
reduce-scatter, for one, costs more per byte than the ring model's half of an all-reduce.

On a CPU the ranks of one host also share its cores (with each other and with whatever else runs
there): ``compute_share`` times a fixed matmul workload run by every rank at once against the same
workload run alone, the factor by which a rank's compute is slower than a step profiled alone."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

SIZES = (4 << 10, 8 << 20)   # bytes: latency-bound, bandwidth-bound
REPS = 7
OPS = ("allreduce", "allgather", "reduce_scatter")
Fitted = Tuple[Tuple[str, float, float], ...]   # (op, latency s per hop, bandwidth bytes/s)


def _median_time(run: Callable[[], object], reps: int) -> float:
    run()  # warm-up: buffers, connections
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_allreduce(allreduce: Callable[[torch.Tensor], object], sizes: Sequence[int] = SIZES,
                   reps: int = REPS) -> Dict[int, float]:
    """Median seconds of ``allreduce`` (a blocking all-reduce of one float32 tensor) per size in bytes.
    Every rank must call it with the same arguments."""
    return {n: _median_time(lambda t=torch.ones(max(1, n // 4)): allreduce(t), reps) for n in sizes}


def time_collectives(sizes: Sequence[int] = SIZES, reps: int = REPS) -> Dict[str, Dict[int, float]]:
    """Median seconds per op and whole-tensor size over torch.distributed's default group (every rank)."""
    import torch.distributed as dist

    ranks = dist.get_world_size()
    out: Dict[str, Dict[int, float]] = {op: {} for op in OPS}
    for n in sizes:
        whole = torch.ones(max(ranks, n // 4 // ranks * ranks))
        part = torch.empty(whole.numel() // ranks)
        out["allreduce"][n] = _median_time(lambda: dist.all_reduce(whole), reps)
        out["allgather"][n] = _median_time(lambda: dist.all_gather_into_tensor(whole, part), reps)
        out["reduce_scatter"][n] = _median_time(lambda: dist.reduce_scatter_tensor(part, whole), reps)
    return out


def work_s(reps: int = 5) -> float:
    """Median seconds of a fixed compute workload (matmuls, ~10 ms on one core) on this process's threads."""
    a = torch.randn(192, 192)
    return _median_time(lambda: [a @ a for _ in range(60)], reps)


def compute_share(barrier: Callable[[], object], alone_s: Callable[[], float]) -> float:
    """How much slower the workload runs on every rank at once than alone (>= 1; every rank calls it;
    ``alone_s`` is called by rank 0 while the others wait in ``barrier``)."""
    barrier()
    together = work_s()
    barrier()
    alone = alone_s()
    barrier()
    return max(1.0, together / max(1e-9, alone))


def fit(ranks: int, times: Dict[int, float], op: str = "allreduce") -> Tuple[float, float]:
    """(latency s per hop, bandwidth bytes/s) of the ring model ``hops (latency + n/g/bandwidth)``
    (hops: 2(g-1) for an all-reduce, g-1 for an all-gather or reduce-scatter) from times at two sizes."""
    (small, t_small), (big, t_big) = sorted(times.items())[0], sorted(times.items())[-1]
    hops = (2 if op == "allreduce" else 1) * (ranks - 1)
    per_byte = max(1e-15, (t_big - t_small) / hops / max(1.0, (big - small) / ranks))
    latency = max(0.0, t_small / hops - small / ranks * per_byte)
    return latency, 1.0 / per_byte


def fit_all(ranks: int, times: Dict[str, Dict[int, float]]) -> Fitted:
    return tuple((op, *fit(ranks, t, op)) for op, t in times.items() if t)


def _child(rank: int, ranks: int, threads: int, init: str, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ranks)
    try:
        times = time_collectives()
        share = compute_share(dist.barrier, lambda: work_s() if rank == 0 else 0.0)
        if rank == 0:
            with open(result, "w", encoding="utf-8") as handle:
                json.dump({"share": share, "times": {op: {str(k): v for k, v in t.items()} for op, t in times.items()}},
                          handle)
    finally:
        dist.destroy_process_group()


def measure_local(ranks: int, threads: int = 1, timeout_s: float = 180.0) -> Tuple[Fitted, float]:
    """Each op's (latency, bandwidth) among ``ranks`` processes on this host (gloo, loopback) with
    ``threads`` intra-op threads each, and their ``compute_share``."""
    ranks = max(2, ranks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "times.json")
        procs: List[subprocess.Popen] = [
            subprocess.Popen([sys.executable, "-m", __name__, str(r), str(ranks), str(threads), f"tcp://127.0.0.1:{port}",
                              result],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(ranks)]
        errors = [p.communicate(timeout=timeout_s)[1] for p in procs]
        failed = [e for p, e in zip(procs, errors) if p.returncode]
        if failed:
            raise RuntimeError("measuring collective rates failed: " + failed[0].decode(errors="replace")[-300:])
        with open(result, encoding="utf-8") as handle:
            doc = json.load(handle)
    times = {op: {int(k): v for k, v in t.items()} for op, t in doc["times"].items()}
    return fit_all(ranks, times), float(doc["share"])


__all__ = ["time_allreduce", "time_collectives", "fit", "fit_all", "measure_local", "work_s", "compute_share",
           "SIZES", "OPS", "Fitted"]

if __name__ == "__main__":  # one rank of measure_local
    _child(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
