"""Per-step reduction timing, identical for every backend so their numbers can be compared.

- a reduction is in flight from the moment it is handed to the library (Horovod's
  ``allreduce_async_``, ``dist.all_reduce(async_op=True)``) until it is observed complete;
- ``allreduce_ms`` is the wall time during which at least one reduction was in flight (union of spans);
- ``allreduce_hidden_frac`` is the part of that union that lies before backward ended (the autograd
  engine's final callback of the backward pass that launched the reductions), i.e. overlapped with
  backward compute; the rest is exposed and shows up as ``comm_wait_ms`` in ``step()``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

from lmsdp.runtime.chrome_trace import ChromeTrace, now_us

STAT_KEYS = ("allreduce_ms", "allreduce_hidden_frac", "comm_wait_ms", "allreduce_count",
             "allreduce_bytes", "backward_passes")
ALLREDUCE_LANE, WAIT_LANE = 100, 101


def _union_ms(spans: List[Tuple[float, float]], limit: Optional[float] = None) -> float:
    """Length (ms) of the union of [start, end] spans in us, optionally clipped to end <= limit."""
    clipped = []
    for s, e in spans:
        if limit is not None:
            e = min(e, limit)
        if e > s:
            clipped.append((s, e))
    clipped.sort()
    total, cur_s, cur_e = 0.0, None, None
    for s, e in clipped:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1000.0



@dataclass
class _Span:
    start: float
    nbytes: int
    name: str
    end: Optional[float] = None


@dataclass
class StepTimer:
    """Collects reduction spans, backward ends and step() waits of one optimizer step.

    Thread-safe: completion callbacks of torch futures run on the process group's threads."""

    trace: Optional[ChromeTrace] = None
    _spans: Dict[Hashable, _Span] = field(default_factory=dict)
    _bwd_ends: List[float] = field(default_factory=list)
    _wait_ms: float = 0.0
    _backward_passes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, key: Hashable, nbytes: int, name: str = "allreduce", t: Optional[float] = None) -> None:
        with self._lock:
            self._spans[key] = _Span(now_us() if t is None else t, int(nbytes), name)

    def finished(self, key: Hashable, t: Optional[float] = None) -> None:
        t = now_us() if t is None else t
        with self._lock:
            span = self._spans.get(key)
            if span is not None and span.end is None:
                span.end = t
                if self.trace is not None:
                    self.trace.span(span.name, ALLREDUCE_LANE, span.start, t, bytes=span.nbytes)

    def is_finished(self, key: Hashable) -> bool:
        with self._lock:
            span = self._spans.get(key)
            return span is not None and span.end is not None

    def backward_ended(self) -> None:
        with self._lock:
            self._bwd_ends.append(now_us())
            self._backward_passes += 1

    def waited(self, start_us: float, end_us: float) -> None:
        with self._lock:
            self._wait_ms += (end_us - start_us) / 1000.0
        if self.trace is not None:
            self.trace.span("comm_wait", WAIT_LANE, start_us, end_us)

    def collect(self) -> Dict[str, float]:
        """Stats since the last call, then reset. Unfinished spans are closed at 'now'."""
        t = now_us()
        with self._lock:
            spans = [(s.start, s.end if s.end is not None else t) for s in self._spans.values()]
            nbytes = sum(s.nbytes for s in self._spans.values())
            # Hidden = before the end of the backward pass in which the reduction was launched.
            hidden = 0.0
            total = _union_ms(spans)
            if spans:
                ends = sorted(self._bwd_ends)
                first = min(s for s, _ in spans)
                # the backward that launched the reductions ends at the first backward end after the
                # first launch (reductions of one step are launched by one backward pass)
                limit = next((e for e in ends if e >= first), None)
                if limit is not None:
                    hidden = _union_ms(spans, limit)
            stats = {
                "allreduce_ms": round(total, 4),
                "allreduce_hidden_frac": round(hidden / total, 4) if total > 0 else 0.0,
                "comm_wait_ms": round(self._wait_ms, 4),
                "allreduce_count": len(spans),
                "allreduce_bytes": nbytes,
                "backward_passes": self._backward_passes,
            }
            self._spans.clear()
            self._bwd_ends.clear()
            self._wait_ms = 0.0
            self._backward_passes = 0
        if self.trace is not None:
            self.trace.flush()
        return stats


class BackwardWatcher:
    """Calls ``on_end`` once at the end of every backward pass that touches the given parameters,
    through the autograd engine's final callback (the same mechanism DDP uses to finalize buckets).
    ``on_grad(p)`` runs after a parameter's gradient has been accumulated."""

    def __init__(self, params: List[torch.nn.Parameter], on_end: Callable[[], None],
                 on_grad: Optional[Callable[[torch.nn.Parameter], None]] = None) -> None:
        self._on_end = on_end
        self._on_grad = on_grad
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end)
        if self._on_grad is not None:
            self._on_grad(p)

    def _end(self) -> None:
        self._queued = False
        self._on_end()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
