"""Transports move bytes between the device and host buffers asynchronously.

``CudaTransport`` uses a swap-out and a swap-in stream, CUDA events and pinned memory.
``LoopbackTransport`` runs the same protocol on CPU with one worker thread per direction and
``threading.Event`` as events, so prefetch ordering, accounting and stalls are exercised without a GPU.
"""
from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Optional, Tuple

import torch


class Transfer(ABC):
    """One asynchronous copy. ``span()`` gives (start, end) in host ``perf_counter`` seconds once done."""

    nbytes: int = 0

    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def host_wait(self) -> None: ...

    @abstractmethod
    def span(self) -> Tuple[float, float]: ...


class Wait:
    """A compute wait on a swap-in: calling it gives the stall in ms; ``start()`` the host-clock
    (``perf_counter`` seconds) moment compute began to wait, for drawing stalls on the timeline."""

    __slots__ = ("_start", "_ms")

    def __init__(self, start: float, ms: float) -> None:
        self._start, self._ms = start, ms

    def __call__(self) -> float:
        return self._ms

    def start(self) -> float:
        return self._start


class Transport(ABC):
    """Copy protocol shared by the engine: out (device->host), alloc + in (host->device), wait."""

    pin_memory: bool = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def copy_out(self, src: torch.Tensor, dst: torch.Tensor) -> Transfer:
        """Start copying 1-D ``src`` (device) into ``dst`` (host); ``src`` stays valid until done."""

    @abstractmethod
    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Swap-in destination, allocated on the consumer (compute) stream (pytorch#106360)."""

    @abstractmethod
    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        """Start copying host ``src`` into device ``dst`` once ``after`` (its swap-out) finished."""

    @abstractmethod
    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        """Make compute wait for ``transfer`` (never a device-wide sync); returns a thunk giving stall ms
        (a :class:`Wait` where the wait's start is known)."""

    def step_begin(self) -> None:
        """Hook at the first pack of a step (CUDA: timing base)."""

    def close(self) -> None:
        """Join workers / release streams."""


# ----------------------------------------------------------------------------------------- loopback
class _LoopTransfer(Transfer):
    __slots__ = ("event", "start", "end", "error", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.event = threading.Event()
        self.start = self.end = 0.0
        self.error: Optional[BaseException] = None
        self.nbytes = nbytes

    def done(self) -> bool:
        return self.event.is_set()

    def host_wait(self) -> None:
        self.event.wait()
        if self.error is not None:
            raise RuntimeError("lmsdp swap loopback copy failed") from self.error

    def span(self) -> Tuple[float, float]:
        self.host_wait()
        return self.start, self.end


class _Worker:
    """A thread draining a FIFO of copies: the loopback analogue of a CUDA stream."""

    def __init__(self, name: str) -> None:
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            fn, tr, after = job
            try:
                if after is not None:
                    after.event.wait()
                tr.start = time.perf_counter()
                fn()
            except BaseException as exc:  # surfaced by host_wait on the consumer side
                tr.error = exc
            tr.end = time.perf_counter()
            del fn, job  # drop the source reference before signalling: memory freed after the copy
            tr.event.set()

    def submit(self, fn: Callable[[], None], tr: _LoopTransfer, after: Optional[_LoopTransfer] = None) -> None:
        self.q.put((fn, tr, after))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)


class LoopbackTransport(Transport):
    """CPU stand-in for a GPU: copies into separate host buffers on worker threads."""

    pin_memory = False

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._out = _Worker("lmsdp-swap-out")
        self._in = _Worker("lmsdp-swap-in")

    def copy_out(self, src: torch.Tensor, dst: torch.Tensor) -> Transfer:
        tr = _LoopTransfer(dst.numel() * dst.element_size())
        self._out.submit(lambda: dst.copy_(src), tr)
        return tr

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        tr = _LoopTransfer(dst.numel() * dst.element_size())
        self._in.submit(lambda: dst.copy_(src), tr, after)  # type: ignore[arg-type]
        return tr

    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        t0 = time.perf_counter()
        transfer.host_wait()
        return Wait(t0, (time.perf_counter() - t0) * 1e3)

    def close(self) -> None:
        self._out.close()
        self._in.close()


# --------------------------------------------------------------------------------------------- cuda
class _CudaTransfer(Transfer):
    __slots__ = ("start_ev", "end_ev", "transport", "nbytes")

    def __init__(self, transport: "CudaTransport", nbytes: int) -> None:
        self.start_ev = torch.cuda.Event(enable_timing=True)
        self.end_ev = torch.cuda.Event(enable_timing=True)
        self.transport = transport
        self.nbytes = nbytes

    def done(self) -> bool:
        return self.end_ev.query()

    def host_wait(self) -> None:
        self.end_ev.synchronize()

    def span(self) -> Tuple[float, float]:
        self.end_ev.synchronize()
        return self.transport.host_time(self.start_ev), self.transport.host_time(self.end_ev)


class CudaTransport(Transport):
    """Swap-out/swap-in streams, timing events, pinned host memory."""

    pin_memory = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.out_stream = torch.cuda.Stream(device)
        self.in_stream = torch.cuda.Stream(device)
        self._base_ev: Optional[torch.cuda.Event] = None
        self._base_host = 0.0

    def step_begin(self) -> None:
        self._base_ev = torch.cuda.Event(enable_timing=True)
        self._base_ev.record(torch.cuda.current_stream(self.device))
        self._base_host = time.perf_counter()

    def host_time(self, ev: "torch.cuda.Event") -> float:
        if self._base_ev is None:
            return 0.0
        return self._base_host + self._base_ev.elapsed_time(ev) / 1e3

    def copy_out(self, src: torch.Tensor, dst: torch.Tensor) -> Transfer:
        tr = _CudaTransfer(self, dst.numel() * dst.element_size())
        self.out_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.out_stream):
            tr.start_ev.record()
            dst.copy_(src, non_blocking=True)
            tr.end_ev.record()
        src.record_stream(self.out_stream)  # allocator reuses the block only after the copy ran
        return tr

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)  # on the current (compute) stream

    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        assert isinstance(after, _CudaTransfer)
        tr = _CudaTransfer(self, dst.numel() * dst.element_size())
        # dst was allocated on the compute stream: it may reuse a block freed there moments ago
        self.in_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.in_stream.wait_event(after.end_ev)
        with torch.cuda.stream(self.in_stream):
            tr.start_ev.record()
            dst.copy_(src, non_blocking=True)
            tr.end_ev.record()
        dst.record_stream(self.in_stream)  # a prefetched-but-dropped dst is not reused mid-copy
        return tr

    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        assert isinstance(transfer, _CudaTransfer)
        stream = torch.cuda.current_stream(self.device)
        if transfer.end_ev.query():
            stream.wait_event(transfer.end_ev)
            return lambda: 0.0
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        stream.wait_event(transfer.end_ev)
        e1.record(stream)
        return _CudaWait(self, e0, e1)

    def close(self) -> None:
        self.out_stream.synchronize()
        self.in_stream.synchronize()


class _CudaWait(Wait):
    """A stall on the compute stream, timed by two events (resolved at step end, off the hot path)."""

    __slots__ = ("_transport", "_e0", "_e1")

    def __init__(self, transport: CudaTransport, e0: "torch.cuda.Event", e1: "torch.cuda.Event") -> None:
        super().__init__(0.0, 0.0)
        self._transport, self._e0, self._e1 = transport, e0, e1

    def __call__(self) -> float:
        self._e1.synchronize()
        return self._e0.elapsed_time(self._e1)

    def start(self) -> float:
        self._e1.synchronize()
        return self._transport.host_time(self._e0)


def make_transport(kind: str, device: torch.device) -> Transport:
    """The registered transport ``kind`` (``swapping/registry.py``); ``auto``: cuda on a CUDA device,
    else loopback."""
    from .registry import TRANSPORTS

    cls = TRANSPORTS.resolve(kind, device).load()
    if cls is CudaTransport and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"swap transport 'cuda' needs a CUDA device, got {device}")
    return cls(device)
