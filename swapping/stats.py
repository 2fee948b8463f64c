"""Per-step swap statistics: a flat dict of numbers for the metrics JSONL, progress bar and summary."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional


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
    late_prefetches: int = 0       # prefetched swap-ins that were still in flight when needed
    swap_out_ms: float = 0.0
    swap_in_ms: float = 0.0
    hidden_frac: float = 0.0       # 1 - stall / (swap-out + swap-in time)
    # saved-tensor accounting covers candidates: device tensors >= threshold, not parameters, deduped
    peak_saved_bytes: int = 0      # peak candidate bytes resident on the device during forward
    resident_saved_bytes: int = 0  # candidate bytes that stayed on the device at the end of forward
    packed_tensors: int = 0        # candidates seen by the pack hook (after dedupe)
    host_pool_bytes: int = 0
    recomputed_modules: int = 0
    max_memory_allocated: Optional[int] = None  # CUDA only

    def finish(self) -> None:
        self.hidden_frac = hidden_fraction(self.stall_ms, self.swap_out_ms + self.swap_in_ms)

    def as_dict(self) -> Dict[str, float]:
        out = asdict(self)
        if out["max_memory_allocated"] is None:
            del out["max_memory_allocated"]
        return out


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

    def add(self, s: StepStats) -> None:
        self.steps += 1
        for name in ("swap_out_bytes", "swap_in_bytes", "swapped_tensors", "swap_in_tensors", "stall_ms",
                     "stalls", "swap_out_ms", "swap_in_ms"):
            setattr(self, name, getattr(self, name) + getattr(s, name))
        self.peak_saved_bytes = max(self.peak_saved_bytes, s.peak_saved_bytes)
        self.host_pool_bytes = max(self.host_pool_bytes, s.host_pool_bytes)
        self.recomputed_modules = s.recomputed_modules

    def as_dict(self) -> Dict[str, float]:
        out = asdict(self)
        out["hidden_frac"] = hidden_fraction(self.stall_ms, self.swap_out_ms + self.swap_in_ms)
        return out


_PEAKS = ("peak_saved_bytes", "max_memory_allocated")       # the largest of the micro-batches
_LAST = ("resident_saved_bytes", "host_pool_bytes", "recomputed_modules")


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
    return out
