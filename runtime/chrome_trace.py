"""Chrome-trace files (chrome://tracing, Perfetto): one writer for every producer (allreduce spans of
the comm backends, compute / swap spans of the swap engine), a tolerant reader and a merger.

Clock: absolute ``time.perf_counter`` in microseconds (CLOCK_MONOTONIC, shared by every process on
one host), so the spans of all ranks and of both producers line up on one timeline when merged."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any, Dict, List, Mapping, Optional

from .trace_schedule import TraceWindow


def now_us() -> float:
    """The trace clock in microseconds."""
    return time.perf_counter() * 1e6


class ChromeTrace:
    """Trace writer, ``pid`` = rank, one named ``tid`` per lane.

    Events go to the file as they come (JSON array form; none are kept in memory) and ``close()``
    ends the array; an unclosed file (a rank that died) is still read by
    chrome://tracing, Perfetto and :func:`load_trace`.

    ``window`` (a :class:`TraceWindow`): span and counter events outside its traced steps are dropped
    (metadata always goes in), so the file holds the scheduled steps only, however long the run."""

    def __init__(self, path: str, rank: int, lanes: Mapping[int, str], window: Optional[TraceWindow] = None) -> None:
        self.path = path
        self.rank = rank
        self.window = window
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f: Optional[IO[str]] = open(path, "w", encoding="utf-8")
        self._f.write("[\n")
        self._first = True
        self._lock = threading.Lock()
        self.emit({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for tid, name in lanes.items():
            self.emit({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})

    @property
    def recording(self) -> bool:
        """Whether events of the step running now go in (always, without a window)."""
        return self.window is None or self.window.active

    def emit(self, event: Dict[str, Any]) -> None:
        if event.get("ph") != "M" and not self.recording:
            return
        with self._lock:
            if self._f is None:
                return
            self._f.write(("" if self._first else ",\n") + json.dumps(event))
            self._first = False

    def span(self, name: str, tid: int, start_us: float, end_us: float, **args: Any) -> None:
        """A complete ('X') event on lane ``tid``."""
        event: Dict[str, Any] = {"name": name, "ph": "X", "pid": self.rank, "tid": tid, "ts": round(start_us, 3),
                                 "dur": round(max(0.0, end_us - start_us), 3)}
        if args:
            event["args"] = args
        self.emit(event)

    def flush(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.write("\n]\n")
                self._f.close()
                self._f = None


def load_trace(path: str) -> List[Dict[str, Any]]:
    """Events of a chrome trace in array or object form, tolerating an unclosed array."""
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("{"):
        return list(json.loads(text).get("traceEvents", []))
    if not text.endswith("]"):
        text = text.rstrip(",\n ") + "]"
    return list(json.loads(text))


def merge_traces(paths: List[str], out: str) -> int:
    """Merge chrome traces (e.g. every rank's allreduce and swap traces) into one file; returns the
    number of events written."""
    events: List[Dict[str, Any]] = []
    for p in paths:
        events.extend(load_trace(p))
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return len(events)


def rank_path(path: str, rank: int, size: int) -> str:
    """Per-rank file name: ``{rank}`` in the path is replaced; otherwise ranks > 0 of a multi-rank
    job get ``.rankN`` before the extension so ranks never write the same file."""
    if "{rank}" in path:
        return path.replace("{rank}", str(rank))
    if size <= 1 or rank == 0:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext}"
