"""Chrome-trace (chrome://tracing, Perfetto) JSON of compute / swap-out / swap-in / stall spans and the
saved-activation memory counter, one pid per rank."""
from __future__ import annotations

import json
import os
import threading
from typing import Dict, List, Optional

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "RANK", "PMI_RANK", "SLURM_PROCID")
TRACKS = {"compute": 0, "swap-out": 1, "swap-in": 2, "stall": 3}
MEMORY_COUNTER = "saved activations on device"  # counter ('C') events: args resident_bytes, device_allocated_bytes


def rank_from_env() -> int:
    """The MPI/torchrun/Slurm rank of this process, 0 when none is set."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class Tracer:
    """Collects complete ('X') events and writes them as chrome trace. Timestamps are absolute
    ``perf_counter`` microseconds (CLOCK_MONOTONIC, shared by processes on a host), the same clock as
    the comm backends' allreduce trace, so ``lmsdp.comm.merge_traces`` lines both up on one timeline."""

    def __init__(self, path: str) -> None:
        self.rank = rank_from_env()
        self.path = path.replace("{rank}", str(self.rank))
        self.events: List[Dict[str, object]] = []
        self._lock = threading.Lock()

    def span(self, track: str, name: str, start: float, end: float, args: Optional[dict] = None) -> None:
        ev: Dict[str, object] = {"name": name, "ph": "X", "pid": self.rank, "tid": TRACKS[track],
                                 "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    def counter(self, name: str, t: float, values: Dict[str, float]) -> None:
        """A counter sample (chrome 'C' event): Perfetto draws it as a stepped line per key."""
        ev: Dict[str, object] = {"name": name, "ph": "C", "pid": self.rank, "ts": t * 1e6, "args": values}
        with self._lock:
            self.events.append(ev)

    def write(self) -> None:
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}}
                 for name, tid in TRACKS.items()]
        with self._lock:
            data = {"traceEvents": meta + list(self.events), "displayTimeUnit": "ms"}
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.path)
