"""Transports move bytes between the device and host buffers asynchronously.

``CudaTransport`` (``cuda_transport.py``) uses a swap-out and a swap-in stream, CUDA events and pinned memory, laid out as
torchtune's activation offloading (``_activation_offloading.py``) does, with prefetching added:

* swap-out: the copy stream waits for compute (the source must be written), copies, records an
  event; the transfer keeps the source alive until the copy has finished (no ``record_stream``: the
  engine retires it when its event has passed, or makes compute wait on it when too many bytes are in
  flight);
* swap-in: the destination is allocated *on the swap-in stream* and the copy waits only for its own
  swap-out, never for compute, so a prefetch can run as far ahead as the engine's window allows;
  compute waits for the copy's event when it uses the tensor. After use, the tensor is *retired*: an
  event on compute marks its last use and the engine keeps the reference until that event has passed
  (or makes the swap-in stream wait on it before the block can be reused: no host sync either way).

``LoopbackTransport`` runs the same protocol on CPU with one worker thread per direction and
``threading.Event`` as events, so prefetch ordering, accounting and stalls are exercised without a GPU.
With ``link_bps`` its copy threads are paced to that many bytes per second: a simulation of a slow
link's speed (for backpressure, lookahead, stalls and the planner's time model on CPU), not a GPU figure.
"""
from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Optional, Tuple

import torch


class Transfer(ABC):
    """One asynchronous copy. ``span()`` gives (start, end) in host ``perf_counter`` seconds once done
    (it blocks until then: call it on finished transfers only, off the hot path)."""

    nbytes: int = 0
    source: Optional[torch.Tensor] = None  # swap-out: the device tensor, alive until the copy finished

    def release(self) -> None:
        """The copy has finished (or compute waits for it): drop the source."""
        self.source = None

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

    def done(self) -> bool:
        """The wait can be read without blocking."""
        return True


class Retired:
    """A swapped-in tensor after its last use: held until compute has passed that use."""

    __slots__ = ("tensor", "nbytes")

    def __init__(self, tensor: Optional[torch.Tensor], nbytes: int) -> None:
        self.tensor, self.nbytes = tensor, nbytes

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        """Make later swap-ins wait for compute to pass the use (device-side); the block may be reused."""
        self.tensor = None


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
        """Swap-in destination (CUDA: allocated on the swap-in stream, so the copy needs no compute wait)."""

    @abstractmethod
    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        """Start copying host ``src`` into device ``dst`` once ``after`` (its swap-out) finished."""

    @abstractmethod
    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        """Make compute wait for ``transfer`` (never a device-wide sync); returns a thunk giving stall ms
        (a :class:`Wait` where the wait's start is known)."""

    def wait_out(self, transfer: Transfer) -> None:
        """Compute waits for swap-out ``transfer`` (never a device-wide sync); its source is dropped."""
        transfer.host_wait()
        transfer.release()

    def retire(self, tensor: torch.Tensor, nbytes: int, users: int) -> Retired:
        """Swapped-in ``tensor`` had its last use just now (loopback: compute is this thread, so done);
        ``users``: references to its storage when the engine alone held it."""
        return Retired(None, nbytes)

    def step_begin(self) -> None:
        """Hook at the first pack of a step (CUDA: timing base)."""

    def close(self) -> None:
        """Join workers / release streams."""


# ----------------------------------------------------------------------------------------- loopback
class _LoopTransfer(Transfer):
    """A copy run by its direction's worker thread, or by a thread that needs it first (a consumer
    does not wait for a busy machine to schedule the worker). Paced: it is *due* at a time fixed
    when it was queued, from the link clock, and counts as done only then."""

    __slots__ = ("event", "start", "end", "error", "nbytes", "due", "_fn", "_after", "_claim")

    def __init__(self, nbytes: int, fn: Callable[[], None], after: Optional["_LoopTransfer"],
                 start: float = 0.0, due: float = 0.0) -> None:
        self.event = threading.Event()            # the bytes are in place
        self.start, self.end, self.due = start, due, due
        self.error: Optional[BaseException] = None
        self.nbytes = nbytes
        self._fn: Optional[Callable[[], None]] = fn
        self._after = after
        self._claim = threading.Lock()            # held by whichever thread runs the copy

    def run(self) -> None:
        """Do the copy in this thread, unless another one has taken it."""
        if not self._claim.acquire(blocking=False):
            return
        t0 = time.perf_counter()
        try:
            if self._after is not None:
                self._after.ensure()
            assert self._fn is not None
            self._fn()
        except BaseException as exc:  # surfaced by host_wait on the consumer side
            self.error = exc
        self._fn = self._after = None  # drop the source: memory freed after the copy
        if not self.due:
            self.start, self.end = t0, time.perf_counter()
        self.event.set()

    def ensure(self) -> None:
        """The bytes are in place (copied here if nobody has started)."""
        self.run()
        self.event.wait()

    def done(self) -> bool:
        return self.event.is_set() and (not self.due or time.perf_counter() >= self.due)

    def host_wait(self) -> None:
        self.ensure()
        if self.error is not None:
            raise RuntimeError("lmsdp swap loopback copy failed") from self.error
        delay = self.due - time.perf_counter()
        if delay > 0:  # paced: the bytes are there, the simulated link delivers them at ``due``
            time.sleep(delay)

    def span(self) -> Tuple[float, float]:
        self.host_wait()
        return self.start, self.end


class _Worker:
    """A thread draining a FIFO of copies: the loopback analogue of a CUDA stream. With ``link_bps``
    the copies follow a link clock: each starts when it is queued (or its ``after`` is due), or when
    the link is free, and is due ``nbytes / link_bps`` seconds later. Copies run at once (by the
    worker or a consumer that needs them); the clock alone says when they are delivered, so a busy
    machine's late thread wake-ups do not slow the simulated link down."""

    def __init__(self, name: str, link_bps: Optional[float] = None) -> None:
        self.link_bps = link_bps
        self._link_free = 0.0
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            tr = self.q.get()
            if tr is None:
                return
            delay = tr.due - time.perf_counter()
            if delay > 0:  # paced: a consumer that needs it earlier runs it itself (no thread hand-off)
                time.sleep(delay)
            tr.run()
            del tr

    def submit(self, fn: Callable[[], None], nbytes: int, after: Optional[_LoopTransfer] = None) -> _LoopTransfer:
        if self.link_bps:
            ready = time.perf_counter() if after is None else max(time.perf_counter(), after.due)
            start = max(self._link_free, ready)
            self._link_free = start + nbytes / self.link_bps
            tr = _LoopTransfer(nbytes, fn, after, start, self._link_free)
        else:
            tr = _LoopTransfer(nbytes, fn, after)
        self.q.put(tr)
        return tr

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)


class LoopbackTransport(Transport):
    """CPU stand-in for a GPU: copies into separate host buffers on worker threads, each direction
    paced to ``link_bps`` bytes/s when given (a full-duplex link, as PCIe is)."""

    pin_memory = False

    def __init__(self, device: torch.device, link_bps: Optional[float] = None) -> None:
        super().__init__(device)
        self.link_bps = link_bps
        self._out = _Worker("lmsdp-swap-out", link_bps)
        self._in = _Worker("lmsdp-swap-in", link_bps)

    def copy_out(self, src: torch.Tensor, dst: torch.Tensor) -> Transfer:
        return self._out.submit(lambda: dst.copy_(src), dst.numel() * dst.element_size())

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        assert isinstance(after, _LoopTransfer)
        return self._in.submit(lambda: dst.copy_(src), dst.numel() * dst.element_size(), after)

    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        t0 = time.perf_counter()
        transfer.host_wait()
        return Wait(t0, (time.perf_counter() - t0) * 1e3)

    def close(self) -> None:
        self._out.close()
        self._in.close()


def storage_users(t: torch.Tensor) -> int:
    """References to ``t``'s storage (tensors and views on it); -1 where torch cannot say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if use_count is None else int(use_count(t.untyped_storage()._cdata))


def make_transport(kind: str, device: torch.device, link_gbps: Optional[float] = None) -> Transport:
    """The registered transport ``kind`` (``swapping/registry.py``); ``auto``: cuda on a CUDA device,
    else loopback. ``link_gbps`` paces the loopback transport (GB/s, 1e9 bytes)."""
    from .registry import TRANSPORTS

    if link_gbps and kind == "auto":
        kind = "loopback"  # asking for a simulated link asks for the transport that simulates it
    cls = TRANSPORTS.resolve(kind, device).load()
    if cls.pin_memory and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"swap transport 'cuda' needs a CUDA device, got {device}")
    if link_gbps:
        if not issubclass(cls, LoopbackTransport):
            raise ValueError("swap.link_gbps paces the loopback transport only (a simulated link); "
                             "a real link runs at its own speed: drop link_gbps or set transport: loopback")
        return LoopbackTransport(device, link_gbps * 1e9)
    return cls(device)
