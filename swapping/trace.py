"""The swap engine's chrome trace: compute / swap-out / swap-in / stall spans and the saved-activation
memory counter of one rank, on the shared clock and writer of ``lmsdp.runtime.chrome_trace`` so comm
and swap spans merge into one timeline."""
from __future__ import annotations

from typing import Dict, Optional

from lmsdp.runtime.chrome_trace import ChromeTrace
from lmsdp.runtime.topology import rank_hint

TRACKS = {"compute": 0, "swap-out": 1, "swap-in": 2, "stall": 3}
MEMORY_COUNTER = "saved activations on device"  # counter ('C') events: args resident_bytes, device_allocated_bytes


class Tracer:
    """Collects spans (seconds of ``perf_counter``) in memory; ``write()`` puts them in ``path``
    (``{rank}`` replaced by this process's rank)."""

    def __init__(self, path: str, rank: Optional[int] = None) -> None:
        self.rank = rank_hint() if rank is None else rank
        self.path = path.replace("{rank}", str(self.rank))
        self._trace = ChromeTrace(self.path, self.rank, {tid: name for name, tid in TRACKS.items()}, buffered=True)

    @property
    def events(self) -> list:
        return self._trace.events

    def span(self, track: str, name: str, start: float, end: float, args: Optional[dict] = None) -> None:
        self._trace.span(name, TRACKS[track], start * 1e6, end * 1e6, **(args or {}))

    def counter(self, name: str, t: float, values: Dict[str, float]) -> None:
        """A counter sample (chrome 'C' event): Perfetto draws it as a stepped line per key."""
        self._trace.emit({"name": name, "ph": "C", "pid": self.rank, "ts": t * 1e6, "args": values})

    def write(self) -> None:
        self._trace.close()
