#!/usr/bin/env python
"""Disk tier benchmark (``swap.disk_dir``), CPU figures: what the spill path achieves against the same
folder's sequential throughput, and what it costs a training step.

1. Throughput, side by side in one run on one folder: ``dd`` writes and reads a file sequentially
   (8 MiB blocks, ``oflag=direct``/``iflag=direct`` where the file system takes it, ``conv=fdatasync``);
   the disk tier (its own worker threads, O_DIRECT where allowed) spills the same bytes as ``--tensors``
   tensors and reads them back (wall clock from the first submit to the last byte). Goal: >= 80 % of dd.
2. Step time at one batch on the CPU loopback transport, everything swapped: host only (no limit) vs
   the disk tier (``host_limit`` 1 byte: every tensor spills). Medians, modes interleaved.

    python scripts/bench_disk.py [--dir /path/on/the/disk] [--mib 512] [--reps 5]   # markdown on stdout
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.disk import ALIGN, DiskTier
from lmsdp.swapping.pool import aligned_empty

warnings.filterwarnings("ignore", message="lmsdp swap")


def dd_rates(folder: str, nbytes: int) -> Tuple[float, float, str]:
    """(write, read) bytes/s of dd on ``folder``, and how it ran (direct or buffered)."""
    path = os.path.join(folder, "dd.bin")
    count = nbytes // (8 << 20)
    for direct in (True, False):
        wflags = ["oflag=direct"] if direct else []
        rflags = ["iflag=direct"] if direct else []
        try:
            t0 = time.perf_counter()
            _run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "conv=fdatasync", *wflags])
            write_s = time.perf_counter() - t0
            if not direct:
                _drop_cache(path)
            t0 = time.perf_counter()
            _run(["dd", f"if={path}", "of=/dev/null", "bs=8M", *rflags])
            read_s = time.perf_counter() - t0
            return count * (8 << 20) / write_s, count * (8 << 20) / read_s, "O_DIRECT" if direct else "buffered"
        except OSError:
            continue
        finally:
            if os.path.exists(path):
                os.unlink(path)
    raise OSError(f"dd cannot write to {folder}")


def _run(cmd: List[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(out.stderr.strip())


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def tier_rates(folder: str, nbytes: int, tensors: int) -> Tuple[float, float, str]:
    """(write, read) bytes/s of the disk tier spilling ``tensors`` tensors of ``nbytes`` in all."""
    size = nbytes // tensors
    tier = DiskTier(folder, None, False)
    try:
        bufs = [aligned_empty(size, ALIGN).fill_(i % 251) for i in range(tensors)]
        t0 = time.perf_counter()
        spills = [tier.spill(b, size, lambda: None, lambda: None) for b in bufs]
        for sp in spills:
            sp.written.wait()
        write_s = time.perf_counter() - t0
        tier.check()
        t0 = time.perf_counter()
        for sp, b in zip(spills, bufs):
            tier.read_ahead(sp, b)
        for sp in spills:
            tier.fetch(sp)
        read_s = time.perf_counter() - t0
        return size * tensors / write_s, size * tensors / read_s, "O_DIRECT" if tier.direct else "buffered"
    finally:
        tier.close()


def mlp(width: int, layers: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])


def step_times(folder: str, batch: int, width: int, layers: int, reps: int) -> Dict[str, Tuple[float, float, float]]:
    """mode -> (median step ms, median disk stall ms, swapped MiB/step)."""
    modes: Dict[str, Optional[SwapEngine]] = {
        "no swap": None,
        "host only": SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, prefetch=2, transport="loopback"), "cpu"),
        "disk tier": SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, prefetch=2, transport="loopback",
                                           host_limit=1, disk_dir=folder), "cpu"),
    }
    torch.manual_seed(0)
    model = mlp(width, layers)
    x = torch.randn(batch, width)
    times: Dict[str, List[float]] = {k: [] for k in modes}
    stalls: Dict[str, List[float]] = {k: [] for k in modes}
    swapped: Dict[str, float] = {k: 0.0 for k in modes}
    for rep in range(reps + 1):  # the first round warms up (pools, learned order)
        for name, engine in modes.items():
            t0 = time.perf_counter()
            if engine is None:
                model(x).square().mean().backward()
            else:
                with engine:
                    loss = model(x).square().mean()
                loss.backward()
                del loss
                st = engine.step_end()
                swapped[name] = st["swap_out_bytes"] / 2 ** 20
                stalls[name].append(st["disk_stall_ms"]) if rep else None
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
            model.zero_grad(set_to_none=True)
    for engine in modes.values():
        if engine is not None:
            engine.close()
    return {k: (statistics.median(times[k]), statistics.median(stalls[k]) if stalls[k] else 0.0, swapped[k])
            for k in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    parser.add_argument("--mib", type=int, default=512, help="bytes written and read per throughput run (MiB)")
    parser.add_argument("--tensors", type=int, default=32, help="spilled tensors the bytes are cut into")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lmsdp-bench-disk-", dir=args.dir)
    nbytes = args.mib << 20
    try:
        rows = []
        for rep in range(args.reps):  # interleaved, medians
            rows.append((dd_rates(folder, nbytes), tier_rates(folder, nbytes, args.tensors)))
        dw = statistics.median(r[0][0] for r in rows)
        dr = statistics.median(r[0][1] for r in rows)
        tw = statistics.median(r[1][0] for r in rows)
        tr = statistics.median(r[1][1] for r in rows)
        print(f"### Disk tier throughput (CPU host, folder {args.dir or tempfile.gettempdir()}, {args.mib} MiB, "
              f"{args.tensors} tensors, median of {args.reps})\n")
        print("| | write GB/s | read GB/s | I/O |")
        print("|---|---:|---:|---|")
        print(f"| dd, sequential 8 MiB blocks | {dw / 1e9:.2f} | {dr / 1e9:.2f} | {rows[0][0][2]} |")
        print(f"| disk tier spill / read-back | {tw / 1e9:.2f} | {tr / 1e9:.2f} | {rows[0][1][2]} |")
        print(f"| disk tier / dd | {tw / dw:.0%} | {tr / dr:.0%} | |\n")
        res = step_times(folder, args.batch, args.width, args.layers, args.reps)
        print(f"### Step time with the disk tier (CPU figures, loopback transport; MLP {args.layers}x{args.width}, "
              f"batch {args.batch}, everything swapped, median of {args.reps})\n")
        print("| mode | step ms | vs host only | disk stall ms | swapped MiB/step |")
        print("|---|---:|---:|---:|---:|")
        base = res["host only"][0]
        for name, (ms, stall, mib) in res.items():
            print(f"| {name} | {ms:.1f} | {ms / base:.2f} | {stall:.1f} | {mib:.0f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
