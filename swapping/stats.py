"""Per-step swap statistics: a flat dict of numbers for the metrics JSONL, progress bar and summary,
and the step-end accounting that turns a step's transfers and compute waits into them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .pool import HostPool
from .trace import Tracer
from .transport import Transfer
from .units import format_size

STALL_SPAN_MS = 0.01  # stalls shorter than this (an already finished copy) are not drawn in the trace


def hidden_fraction(stall_ms: float, swap_ms: float) -> float:
    """Share of swap time that compute did not wait for: 1 - stall / (swap-out + swap-in), in [0, 1]."""
    return 1.0 if swap_ms <= 0 else min(1.0, max(0.0, 1.0 - stall_ms / swap_ms))


@dataclass
class StepStats:
    """What one training step moved, how long it took, and how much of it compute had to wait for."""

    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    swapped_tensors: int = 0
    swap_in_tensors: int = 0
    stall_ms: float = 0.0          # compute time blocked on swap-ins (sync copies + late prefetches)
    stalls: int = 0                # unpacks that found their tensor not yet requested (synchronous copy)
    late_prefetches: int = 0       # prefetched swap-ins compute still had to wait for (device time)
    swap_out_ms: float = 0.0
    swap_in_ms: float = 0.0
    hidden_frac: float = 0.0       # 1 - stall / (swap-out + swap-in time)
    # saved-tensor accounting covers candidates: device tensors >= threshold, not parameters, deduped
    peak_saved_bytes: int = 0      # peak candidate bytes resident on the device during forward
    peak_resident_bytes: int = 0   # the same, swap-outs counted until their copy finished (after each pack)
    swap_out_waits: int = 0        # times compute waited for a swap-out (swap_out_window full)
    peak_swapin_bytes: int = 0     # most swapped-in bytes on the device not yet passed by compute
    resident_saved_bytes: int = 0  # candidate bytes that stayed on the device at the end of forward
    packed_tensors: int = 0        # candidates seen by the pack hook (after dedupe)
    host_pool_bytes: int = 0
    recomputed_modules: int = 0
    # per tier (``storage.py``): bytes that went to the host pool, and the disk tier's traffic; GB/s are per
    # worker operation (bytes over the time a write / read call took), stall: compute waiting on disk reads
    host_tier_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_ms: float = 0.0
    disk_read_ms: float = 0.0
    disk_write_gbps: float = 0.0
    disk_read_gbps: float = 0.0
    disk_stall_ms: float = 0.0
    disk_write_waits: int = 0      # times compute waited for a disk write (swap_out_window of writes in flight)
    disk_reads_ahead: int = 0      # spilled tensors read back ahead of need (the second prefetch level)
    disk_reads_forced: int = 0     # spilled tensors compute needed before any read of them had started
    disk_peak_bytes: int = 0       # most bytes in spill files at once
    disk_staging_bytes: int = 0    # host buffers the disk tier's transfers hold (beyond host_limit)
    max_memory_allocated: Optional[int] = None  # CUDA only

    def finish(self, resident: int, pool_bytes: int, recomputed: int, device: torch.device) -> None:
        """Step end: what stayed resident, the pool's size, the device's peak (CUDA; its peak is reset)."""
        self.resident_saved_bytes, self.host_pool_bytes, self.recomputed_modules = resident, pool_bytes, recomputed
        if device.type == "cuda":
            self.max_memory_allocated = int(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        self.hidden_frac = hidden_fraction(self.stall_ms, self.swap_out_ms + self.swap_in_ms)
        self.disk_write_gbps, self.disk_read_gbps = disk_rates(self.disk_write_bytes, self.disk_write_ms,
                                                               self.disk_read_bytes, self.disk_read_ms)

    def as_dict(self) -> Dict[str, float]:
        out = asdict(self)
        if out["max_memory_allocated"] is None:
            del out["max_memory_allocated"]
        return out


def disk_rates(write_bytes: float, write_ms: float, read_bytes: float, read_ms: float) -> Tuple[float, float]:
    """(write, read) GB/s of the disk tier's worker operations (0 where nothing moved)."""
    return (write_bytes / write_ms / 1e6 if write_ms > 0 else 0.0, read_bytes / read_ms / 1e6 if read_ms > 0 else 0.0)


def zero_stats() -> Dict[str, float]:
    """The pass-through engine's step result: every key, all zeros."""
    return {f.name: 0 for f in fields(StepStats) if f.name != "max_memory_allocated"}


@dataclass
class Totals:
    """Sums over all steps for the end-of-run table."""

    steps: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    swapped_tensors: int = 0
    swap_in_tensors: int = 0
    stall_ms: float = 0.0
    stalls: int = 0
    swap_out_ms: float = 0.0
    swap_in_ms: float = 0.0
    peak_saved_bytes: int = 0
    host_pool_bytes: int = 0
    recomputed_modules: int = 0
    host_tier_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_ms: float = 0.0
    disk_read_ms: float = 0.0
    disk_stall_ms: float = 0.0
    disk_peak_bytes: int = 0
    disk_staging_bytes: int = 0

    def add(self, s: StepStats) -> None:
        self.steps += 1
        for name in ("swap_out_bytes", "swap_in_bytes", "swapped_tensors", "swap_in_tensors", "stall_ms",
                     "stalls", "swap_out_ms", "swap_in_ms", "host_tier_bytes", "disk_write_bytes", "disk_read_bytes",
                     "disk_write_ms", "disk_read_ms", "disk_stall_ms"):
            setattr(self, name, getattr(self, name) + getattr(s, name))
        self.peak_saved_bytes = max(self.peak_saved_bytes, s.peak_saved_bytes)
        self.disk_peak_bytes = max(self.disk_peak_bytes, s.disk_peak_bytes)
        self.disk_staging_bytes = max(self.disk_staging_bytes, s.disk_staging_bytes)
        self.host_pool_bytes = max(self.host_pool_bytes, s.host_pool_bytes)
        self.recomputed_modules = s.recomputed_modules

    def as_dict(self) -> Dict[str, float]:
        out = asdict(self)
        out["hidden_frac"] = hidden_fraction(self.stall_ms, self.swap_out_ms + self.swap_in_ms)
        out["disk_write_gbps"], out["disk_read_gbps"] = disk_rates(self.disk_write_bytes, self.disk_write_ms,
                                                                   self.disk_read_bytes, self.disk_read_ms)
        return out

    def summary(self, pool: Optional[HostPool]) -> Dict[str, float]:
        """The end-of-run table's numbers: these totals and the host pool's size (``None``: engine off)."""
        if pool is None:
            return dict(Totals().as_dict(), host_pool_allocations=0)
        return dict(self.as_dict(), host_pool_bytes=pool.total_bytes, host_pool_allocations=pool.allocations)


def describe(s: Dict[str, float]) -> str:
    """A summary in one line for logs."""
    return (f"steps={s['steps']} swapped_out={s['swap_out_bytes']} ({format_size(s['swap_out_bytes'])}) "
            f"swapped_in={s['swap_in_bytes']} tensors={s['swapped_tensors']} stalls={s['stalls']} "
            f"stall_ms={s['stall_ms']:.1f} hidden={s['hidden_frac']:.2f} "
            f"host_pool={format_size(s['host_pool_bytes'])}"
            + (f" disk={format_size(s['disk_write_bytes'])} written at {s['disk_write_gbps']:.2f} GB/s, "
               f"read at {s['disk_read_gbps']:.2f} GB/s" if s.get("disk_write_bytes") else ""))


class StepLedger:
    """Transfers and compute waits not resolved yet, turned into times (and trace spans) at step end.

    ``close(block=False)`` reads only what has finished (an event query, never a host sync: step end
    runs inside the next forward's first pack in script mode) and carries the rest into the next
    step's ledger; ``close(block=True)`` waits for everything (at ``engine.close()``)."""

    def __init__(self) -> None:
        self.transfers: List[Tuple[str, Transfer, int]] = []      # (swap-out | swap-in, transfer, seq)
        self.waits: List[Tuple[Callable[[], float], bool]] = []  # (stall thunk, was prefetched)

    def transfer(self, kind: str, tr: Transfer, seq: int) -> None:
        self.transfers.append((kind, tr, seq))

    def wait(self, thunk: Callable[[], float], prefetched: bool) -> None:
        self.waits.append((thunk, prefetched))

    def close(self, st: StepStats, tracer: Optional[Tracer], step_id: int, block: bool) -> "StepLedger":
        """Add what has finished to ``st`` (and ``tracer``); returns a ledger of what has not."""
        rest = StepLedger()
        for kind, tr, seq in self.transfers:
            if not block and not tr.done():
                rest.transfers.append((kind, tr, seq))
                continue
            start, end = tr.span()
            ms = (end - start) * 1e3
            if kind == "swap-out":
                st.swap_out_ms += ms
            else:
                st.swap_in_ms += ms
            if tracer is not None:
                tracer.span(kind, f"{kind} #{seq}", start, end, {"bytes": tr.nbytes, "step": step_id})
        for thunk, prefetched in self.waits:
            if not block and not getattr(thunk, "done", lambda: True)():
                rest.waits.append((thunk, prefetched))
                continue
            ms = thunk()
            st.stall_ms += ms
            if prefetched and ms >= STALL_SPAN_MS:
                st.late_prefetches += 1
            start = getattr(thunk, "start", None)
            if tracer is not None and ms >= STALL_SPAN_MS and start is not None:
                t0 = start()
                tracer.span("stall", "swap-in stall", t0, t0 + ms / 1e3, {"ms": ms, "step": step_id})
        return rest

_PEAKS = ("peak_saved_bytes", "max_memory_allocated", "disk_peak_bytes")       # the largest of the micro-batches
_LAST = ("resident_saved_bytes", "host_pool_bytes", "recomputed_modules", "disk_staging_bytes")


def combine_steps(first: Dict[str, float], second: Dict[str, float]) -> Dict[str, float]:
    """Two engine steps' stats as one (gradient accumulation: one engine step per micro-batch, one
    record per optimizer step): counts, bytes and times add, peaks take the larger, levels the later."""
    if not first:
        return dict(second)
    out = dict(second)
    for key, value in second.items():
        if key in _PEAKS:
            out[key] = max(value, first.get(key, 0))
        elif key not in _LAST and key != "hidden_frac":
            out[key] = first.get(key, 0) + value
    if "hidden_frac" in out:
        out["hidden_frac"] = hidden_fraction(out.get("stall_ms", 0.0), out.get("swap_out_ms", 0.0) + out.get("swap_in_ms", 0.0))
    if "disk_write_gbps" in out:
        out["disk_write_gbps"], out["disk_read_gbps"] = disk_rates(out["disk_write_bytes"], out["disk_write_ms"],
                                                                   out["disk_read_bytes"], out["disk_read_ms"])
    return out
