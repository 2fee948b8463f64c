"""Shared parts of the comm backends: the error type, the backend interface, per-step reduction
timing (allreduce wall time and the part hidden behind backward) and the allreduce chrome trace.

Timing model, identical for every backend so their numbers can be compared:
- a reduction is in flight from the moment it is handed to the library (Horovod's
  ``allreduce_async_``, ``dist.all_reduce(async_op=True)``) until it is observed complete;
- ``allreduce_ms`` is the wall time during which at least one reduction was in flight (union of spans);
- ``allreduce_hidden_frac`` is the part of that union that lies before backward ended (the autograd
  engine's final callback of the backward pass that launched the reductions), i.e. overlapped with
  backward compute; the rest is exposed and shows up as ``comm_wait_ms`` in ``step()``.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch

from .config import CommConfig

STAT_KEYS = ("allreduce_ms", "allreduce_hidden_frac", "comm_wait_ms", "allreduce_count",
             "allreduce_bytes", "backward_passes")


class CommError(RuntimeError):
    """A collective failed or timed out (typically a dead or stuck peer). The message names the
    backend and, where it can be found out, the peer rank."""

    def __init__(self, message: str, backend: str = "", peer: Optional[int] = None) -> None:
        super().__init__(message)
        self.backend = backend
        self.peer = peer


def now_us() -> float:
    """Trace clock in microseconds: CLOCK_MONOTONIC (``time.perf_counter``), shared by all processes
    on one machine, so spans of different ranks and of the swap engine line up when merged."""
    return time.perf_counter() * 1e6


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


class ChromeTrace:
    """Append-only chrome-trace writer (JSON array format, one ``pid`` per rank) for allreduce spans.

    Events are appended as they happen and the array is closed on ``close()``; an unclosed file (a
    rank that died) is still read by chrome://tracing / Perfetto and by :func:`load_trace`."""

    def __init__(self, path: str, rank: int, backend: str) -> None:
        self.path = path
        self.rank = rank
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "w", encoding="utf-8")
        self._f.write("[\n")
        self._first = True
        self._lock = threading.Lock()
        self.emit({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        self.emit({"name": "thread_name", "ph": "M", "pid": rank, "tid": 100,
                   "args": {"name": f"allreduce ({backend})"}})
        self.emit({"name": "thread_name", "ph": "M", "pid": rank, "tid": 101,
                   "args": {"name": "comm wait in step()"}})

    def emit(self, event: Dict[str, Any]) -> None:
        with self._lock:
            if self._f is None:
                return
            self._f.write(("" if self._first else ",\n") + json.dumps(event))
            self._first = False

    def span(self, name: str, tid: int, start_us: float, end_us: float, **args: Any) -> None:
        self.emit({"name": name, "ph": "X", "pid": self.rank, "tid": tid, "ts": round(start_us, 3),
                   "dur": round(max(0.0, end_us - start_us), 3), "args": args})

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
    """Merge chrome traces (e.g. every rank's allreduce trace and the swap engine's) into one file;
    returns the number of events written."""
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
                    self.trace.span(span.name, 100, span.start, t, bytes=span.nbytes)

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
            self.trace.span("comm_wait", 101, start_us, end_us)

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



class OptimizerProxy:
    """Looks like the wrapped ``self.optimizer`` (param_groups, state, state dicts, any other attribute)
    so schedulers, GradScaler and checkpoint code treat a backend's optimizer as the torch one."""

    optimizer: Any

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["optimizer"], name)


class Backend(ABC):
    """What the worker uses to keep data-parallel ranks in step. See ``lmsdp.comm`` for the API."""

    name: str = "?"

    def __init__(self, config: CommConfig) -> None:
        self.config = config
        self.rank = 0
        self.size = 1
        self.local_rank = 0
        self.local_size = 1
        self.timer = StepTimer()

    def _open_trace(self) -> None:
        if self.config.timeline:
            path = rank_path(self.config.timeline, self.rank, self.size)
            self.timer.trace = ChromeTrace(path, self.rank, self.name)

    @property
    def trace_path(self) -> Optional[str]:
        """Where this rank's allreduce chrome trace goes (None without ``timeline``)."""
        return self.timer.trace.path if self.timer.trace is not None else None

    @abstractmethod
    def broadcast_state(self, model: torch.nn.Module, optimizer: Optional[Any] = None) -> None:
        """Rank 0's parameters/buffers and optimizer state to every rank (start and after resume)."""

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
        """An optimizer whose gradients are reduced across ranks as they become ready in backward."""

    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str = "average") -> torch.Tensor:
        """Reduced copy of ``tensor`` (for metrics such as the loss)."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (small picklable objects: checksums, flags), in rank order."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every rank got here."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the backend; safe to call twice and after a failure."""

    def step_stats(self) -> Dict[str, float]:
        """allreduce_ms, allreduce_hidden_frac, comm_wait_ms, allreduce_count, allreduce_bytes,
        backward_passes since the previous call (call once per optimizer step); JSON-able."""
        return self.timer.collect()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def cpu_state(obj: Any) -> Any:
    """Copy of a (nested) state dict with every tensor on the CPU: what is broadcast as a Python
    object, so unpickling never allocates on another rank's GPU; ``load_state_dict`` moves tensors
    back to each parameter's device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_state(v) for v in obj)
    return obj


def pid_alive(pid: int) -> bool:
    """False when the process is gone or a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def dead_peers(rank: int, peers: List[Tuple[str, int]]) -> List[int]:
    """Ranks on this host whose process is gone; ``peers`` is (hostname, pid) per rank."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(peers) if r != rank and h == host and not pid_alive(pid)]


def peer_error(backend: str, what: str, exc: BaseException, rank: int, size: int,
               peers: List[Tuple[str, int]], timeout_s: float) -> CommError:
    """CommError naming the peer: dead local peers if any are found, else the only other rank of a
    2-rank job, else 'unknown' (a remote peer or a live but stuck one)."""
    dead = dead_peers(rank, peers) if peers else []
    peer: Optional[int] = None
    if dead:
        peer = dead[0]
        who = "peer rank " + ", ".join(str(r) for r in dead) + " (process gone)"
    elif size == 2:
        peer = 1 - rank
        who = f"peer rank {peer}"
    else:
        who = "peer rank unknown"
    text = str(exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    return CommError(f"{backend} backend: {what} with {who} failed/timed out "
                     f"(timeout {timeout_s:g} s, rank {rank}/{size}): {detail}",
                     backend=backend, peer=peer)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper returned by ``wrap_optimizer`` (or the argument)."""
    return getattr(optimizer, "optimizer", optimizer)


def info(message: str) -> None:
    """One line to stderr with the project's prefix."""
    print(f"[lmsdp] {message}", file=sys.stderr, flush=True)
