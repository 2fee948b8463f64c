"""The swap engine's chrome trace: compute / swap-out / swap-in spans of one rank, on the shared clock
and writer of ``lmsdp.runtime.chrome_trace`` so comm and swap spans merge into one timeline."""
from __future__ import annotations

from typing import Optional

from lmsdp.runtime.chrome_trace import ChromeTrace
from lmsdp.runtime.topology import rank_hint

TRACKS = {"compute": 0, "swap-out": 1, "swap-in": 2}


class Tracer:
    """Collects spans (seconds of ``perf_counter``) in memory; ``write()`` puts them in ``path``
    (``{rank}`` replaced by this process's rank)."""

    def __init__(self, path: str, rank: Optional[int] = None) -> None:
        self.rank = rank_hint() if rank is None else rank
        self.path = path.replace("{rank}", str(self.rank))
        self._trace = ChromeTrace(self.path, self.rank, {tid: name for name, tid in TRACKS.items()}, buffered=True)

    def span(self, track: str, name: str, start: float, end: float, args: Optional[dict] = None) -> None:
        self._trace.span(name, TRACKS[track], start * 1e6, end * 1e6, **(args or {}))

    def write(self) -> None:
        self._trace.close()
