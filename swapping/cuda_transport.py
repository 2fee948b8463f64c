"""The CUDA transport: swap-out and swap-in streams, events, pinned host memory (see ``transport.py``
for the protocol and the design, after torchtune's activation offloading)."""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch

from .transport import Retired, Transfer, Transport, Wait, storage_users

class _CudaTransfer(Transfer):
    __slots__ = ("start_ev", "end_ev", "transport", "nbytes", "source")

    def __init__(self, transport: "CudaTransport", nbytes: int, source: Optional[torch.Tensor] = None) -> None:
        self.start_ev = torch.cuda.Event(enable_timing=True)
        self.end_ev = torch.cuda.Event(enable_timing=True)
        self.transport = transport
        self.nbytes = nbytes
        self.source = source

    def done(self) -> bool:
        return self.end_ev.query()

    def host_wait(self) -> None:
        self.end_ev.synchronize()

    def span(self) -> Tuple[float, float]:
        self.end_ev.synchronize()
        return self.transport.host_time(self.start_ev), self.transport.host_time(self.end_ev)


class _CudaRetired(Retired):
    """A swapped-in block after its last use on compute: ``event`` marks that use."""

    __slots__ = ("event", "stream")

    def __init__(self, tensor: torch.Tensor, nbytes: int, event: "torch.cuda.Event",
                 stream: "torch.cuda.Stream") -> None:
        super().__init__(tensor, nbytes)
        self.event, self.stream = event, stream

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.stream.wait_event(self.event)  # later swap-ins (that may reuse the block) run after the use
        self.tensor = None


class CudaTransport(Transport):
    """Swap-out/swap-in streams, events for ordering and timing, pinned host memory."""

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
        # the transfer holds ``src`` until the copy finished: compute cannot reuse the block before
        tr = _CudaTransfer(self, dst.numel() * dst.element_size(), src)
        self.out_stream.wait_stream(torch.cuda.current_stream(self.device))  # src is written
        with torch.cuda.stream(self.out_stream):
            tr.start_ev.record()
            dst.copy_(src, non_blocking=True)
            tr.end_ev.record()
        return tr

    def wait_out(self, transfer: Transfer) -> None:
        assert isinstance(transfer, _CudaTransfer)
        torch.cuda.current_stream(self.device).wait_event(transfer.end_ev)
        transfer.release()  # compute's later allocations run after the copy: the block may be reused

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with torch.cuda.stream(self.in_stream):  # the swap-in stream's pool: reuse is ordered by it
            return torch.empty(numel, dtype=dtype, device=self.device)

    def copy_in(self, src: torch.Tensor, dst: torch.Tensor, after: Transfer) -> Transfer:
        assert isinstance(after, _CudaTransfer)
        tr = _CudaTransfer(self, dst.numel() * dst.element_size())
        self.in_stream.wait_event(after.end_ev)  # its own swap-out only: never compute
        with torch.cuda.stream(self.in_stream):
            tr.start_ev.record()
            dst.copy_(src, non_blocking=True)
            tr.end_ev.record()
        return tr

    def compute_wait(self, transfer: Transfer) -> Callable[[], float]:
        assert isinstance(transfer, _CudaTransfer)
        stream = torch.cuda.current_stream(self.device)
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        stream.wait_event(transfer.end_ev)
        e1.record(stream)
        return _CudaWait(self, e0, e1)

    def retire(self, tensor: torch.Tensor, nbytes: int, users: int) -> Retired:
        stream = torch.cuda.current_stream(self.device)
        if users < 0 or storage_users(tensor) > users:
            # someone else (a view in an output, a checkpoint) still holds the block: let the
            # allocator defer its reuse past compute's work so far (the rare case torchtune notes)
            tensor.record_stream(stream)
            return Retired(None, nbytes)
        event = torch.cuda.Event()
        event.record(stream)
        return _CudaRetired(tensor, nbytes, event, self.in_stream)

    def close(self) -> None:
        self.out_stream.synchronize()
        self.in_stream.synchronize()


class _CudaWait(Wait):
    """A stall on the compute stream, timed by two events (resolved once they have passed)."""

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

    def done(self) -> bool:
        return self._e1.query()


