"""Where this rank sits: rank, local rank, size, device, threads. (Extended by the launcher issue.)"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Topology:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    node_rank: int = 0
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def threads(self, configured: int = 0) -> int:
        if configured > 0:
            return configured
        return max(1, (os.cpu_count() or 1) // max(1, self.local_size))


def detect_topology() -> Topology:
    return Topology()
