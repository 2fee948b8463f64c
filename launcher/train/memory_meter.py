"""This rank's memory as a per-step figure: resident host memory (RSS) and, on CUDA, the caching
allocator's reserved and allocated bytes, with their peaks over the run. In the metrics JSONL and
summary.json, and drawn over the run by ``lmsrun report``, so a leak shows as a slope at a glance
(the host memory is what the swap engine's pool needs)."""
from __future__ import annotations

from typing import Dict, List

import psutil
import torch

class MemoryMeter:
    """``sample()`` once per step: ``rss_bytes`` (and ``device_reserved_bytes`` /
    ``device_allocated_bytes`` on CUDA) now; ``peaks`` holds the largest of each seen so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self.peaks: Dict[str, int] = {}

    def sample(self) -> Dict[str, int]:
        now = {"rss_bytes": int(self._process.memory_info().rss)}
        if self.device.type == "cuda":  # the allocator's own counters: no device sync
            now["device_reserved_bytes"] = int(torch.cuda.memory_reserved(self.device))
            now["device_allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
        for key, value in now.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
        return now


def peak_totals(peaks_by_rank: List[Dict[str, int]]) -> Dict[str, int]:
    """Summary rows from every rank's peaks: ``rss_peak_bytes`` (largest over ranks) and
    ``rss_peak_rank`` (the rank that had it), and the same for the device figures."""
    out: Dict[str, int] = {}
    for key in sorted({k for peaks in peaks_by_rank for k in peaks}):
        values = [peaks.get(key, 0) for peaks in peaks_by_rank]
        name = key[:-len("_bytes")]
        out[f"{name}_peak_bytes"] = max(values)
        out[f"{name}_peak_rank"] = values.index(max(values))
    return out
