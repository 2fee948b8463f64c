"""The swap engine's chrome trace: compute / swap-out / swap-in / stall spans and the saved-activation
memory counter of one rank, on the shared clock and writer of ``lmsdp.runtime.chrome_trace`` so comm
and swap spans merge into one timeline. Only the steps of a :class:`TraceWindow` are recorded, and
events stream to the file as they come: memory and file size do not grow with the run's length."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

from lmsdp.runtime.chrome_trace import ChromeTrace
from lmsdp.runtime.topology import rank_hint
from lmsdp.runtime.trace_schedule import TraceSchedule, TraceWindow

TRACKS = {"compute": 0, "swap-out": 1, "swap-in": 2, "stall": 3}
MEMORY_COUNTER = "saved activations on device"  # counter ('C') events: args resident_bytes, device_allocated_bytes


class Tracer:
    """Streams spans (seconds of ``perf_counter``) to ``path`` (``{rank}`` replaced by this process's
    rank) during the traced steps. ``window``: a :class:`TraceWindow` the caller's training loop moves
    step by step, or a :class:`TraceSchedule` (default: the default schedule) followed by the engine's
    own step count (``begin_step``; script mode)."""

    def __init__(self, path: str, rank: Optional[int] = None,
                 window: Union[TraceWindow, TraceSchedule, None] = None) -> None:
        self.rank = rank_hint() if rank is None else rank
        self.path = path.replace("{rank}", str(self.rank))
        self._owns_window = not isinstance(window, TraceWindow)
        self.window = TraceWindow(window or TraceSchedule()) if self._owns_window else window
        self._trace = ChromeTrace(self.path, self.rank, {tid: name for name, tid in TRACKS.items()},
                                  window=self.window)

    @property
    def recording(self) -> bool:
        """Whether the step running now is traced."""
        return self.window.active

    @property
    def step(self) -> int:
        """The step running now (the training step under the launcher; the engine's count otherwise)."""
        return self.window.step

    def begin_step(self, engine_step: int) -> bool:
        """The engine starts its step ``engine_step``; returns whether it is traced."""
        return self.window.begin(engine_step) if self._owns_window else self.window.active

    def span(self, track: str, name: str, start: float, end: float, args: Optional[dict] = None) -> None:
        self._trace.span(name, TRACKS[track], start * 1e6, end * 1e6, **(args or {}))

    def counter(self, name: str, t: float, values: Dict[str, float]) -> None:
        """A counter sample (chrome 'C' event): Perfetto draws it as a stepped line per key."""
        self._trace.emit({"name": name, "ph": "C", "pid": self.rank, "ts": t * 1e6, "args": values})

    def memory(self, saved: List[Tuple[float, int]], device: List[Tuple[float, int]]) -> None:
        """A step's memory samples as counters (saved candidate bytes; the device allocator's figure),
        flushed so that a killed run keeps its recorded steps."""
        for t, held in saved:
            self.counter(MEMORY_COUNTER, t, {"resident_bytes": held})
        for t, allocated in device:
            self.counter("device memory allocated", t, {"device_allocated_bytes": allocated})
        self.flush()

    def flush(self) -> None:
        self._trace.flush()

    def write(self) -> None:
        self._trace.close()
