"""Bytes between the device and the host that are not settled yet, and the two windows that bound them.

* swap-out window: a swapped-out tensor stays on the device until its copy has *finished* (not when it
  is queued). Past ``out_window`` bytes in flight, compute waits (device-side) for the oldest copies,
  as torchtune's forward stash does: without it, layers that outrun the link queue copies without
  limit and the forward peak approaches that of no swapping.
* swap-in window: a swapped-in tensor occupies the device from its copy's start until compute has
  passed its last use (its *retirement* has completed). Prefetches are issued while they fit in
  ``in_window`` bytes; to make room, the swap-in stream waits for compute to pass the oldest retired
  uses (torchtune's chain of events), never for the compute tail, and the host never blocks on CUDA.

The windows are in bytes, so the bound holds whatever the mix of tensor sizes.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Tuple

import torch

from .transport import Retired, Transfer, Transport


class InFlight:
    """The engine's in-flight accounting (called under the engine's lock)."""

    def __init__(self, transport: Transport, out_window: int, in_window: int) -> None:
        self.transport = transport
        self.out_window = max(1, int(out_window))
        self.in_window = max(1, int(in_window))
        self._out: Deque[Tuple[Transfer, int]] = deque()   # swap-outs in queue order (one stream: FIFO)
        self._retired: Deque[Retired] = deque()
        self.out_bytes = 0        # swapped out, copy not known finished
        self.in_bytes = 0         # swapped in and not retired past compute (ahead of use, in use, retiring)
        self.out_waits = 0        # times compute had to wait for a swap-out (backpressure)
        self.peak_in_bytes = 0    # the most ``in_bytes`` since the last ``take_step``

    # ------------------------------------------------------------------------------------ swap-out
    def add_out(self, tr: Transfer, nbytes: int) -> None:
        """Swap-out ``tr`` was queued; past the window, compute waits for the oldest copies first."""
        self.poll_out()
        while self._out and self.out_bytes + nbytes > self.out_window:
            old, n = self._out.popleft()
            self.transport.wait_out(old)
            self.out_bytes -= n
            self.out_waits += 1
        self._out.append((tr, nbytes))
        self.out_bytes += nbytes

    def poll_out(self) -> None:
        """Settle the swap-outs whose copy has finished (in order; a query, never a wait)."""
        out = self._out
        while out and out[0][0].done():
            tr, n = out.popleft()
            tr.release()
            self.out_bytes -= n

    def take_step(self) -> Tuple[int, int]:
        """(backpressure waits, peak swap-in bytes) since the last call: one step's figures."""
        waits, peak = self.out_waits, self.peak_in_bytes
        self.out_waits, self.peak_in_bytes = 0, self.in_bytes
        return waits, peak

    # ------------------------------------------------------------------------------------- swap-in
    def room_in(self, nbytes: int, force: bool) -> bool:
        """Can a swap-in of ``nbytes`` start now? Retired uses that compute has passed are dropped,
        and the oldest others are waited for on the swap-in stream until it fits. ``force`` (compute
        needs it now): start it anyway once nothing more can be freed."""
        self.poll_in()
        while self._retired and self.in_bytes + nbytes > self.in_window:
            old = self._retired.popleft()
            old.wait()
            self.in_bytes -= old.nbytes
        return force or self.in_bytes == 0 or self.in_bytes + nbytes <= self.in_window

    def add_in(self, nbytes: int) -> None:
        self.in_bytes += nbytes
        self.peak_in_bytes = max(self.peak_in_bytes, self.in_bytes)

    def retire(self, tensor: torch.Tensor, nbytes: int, users: int) -> None:
        """A swapped-in tensor's last use was queued: it counts until compute has passed it
        (``users``: references to its storage when the engine alone held it)."""
        self._retired.append(self.transport.retire(tensor, nbytes, users))

    def drop_unused(self, nbytes: int) -> None:
        """A swapped-in tensor that was never used went away (its graph was freed)."""
        self.in_bytes -= nbytes

    def poll_in(self) -> None:
        retired = self._retired
        while retired and retired[0].done():
            self.in_bytes -= retired.popleft().nbytes
