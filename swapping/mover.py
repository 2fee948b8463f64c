"""How a handle's bytes move: pooled host buffers, the transport's copies and the in-flight windows.

The engine decides and counts; the mover does the copying. Swap-out copies the tensor's storage
span (so views and odd strides come back bit-exact) into a pooled host buffer; swap-in allocates a
destination with the original first-element alignment and copies it back.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .config import SwapConfig
from .handles import Handle
from .inflight import InFlight
from .pool import HostPool
from .transport import Transport, make_transport, storage_users
from .units import parse_size


class Mover:
    """One engine's copy mechanics (called under the engine's lock, except ``released``' pool part)."""

    def __init__(self, config: SwapConfig, device: torch.device) -> None:
        self.transport: Transport = make_transport(config.transport, device, config.link_gbps)
        self.inflight = InFlight(self.transport, parse_size(config.swap_out_window) or 1,
                                 parse_size(config.prefetch_window) or 1)
        self.pool = HostPool(pin_memory=self.transport.pin_memory, limit=parse_size(config.host_limit))

    def swap_out(self, h: Handle) -> None:
        """Start copying resident ``h`` to a host buffer; past the swap-out window compute waits first."""
        t = h.tensor
        assert t is not None
        buf = self.pool.acquire(h.span_bytes)
        host = buf[:h.span_bytes].view(h.dtype)
        src = t.detach().as_strided((h.span,), (1,), t.storage_offset())
        h.out_tr = self.transport.copy_out(src, host)
        h.host, h.host_view, h.tensor = buf, host, None
        del src, t
        self.inflight.add_out(h.out_tr, h.nbytes)

    def swap_in(self, h: Handle, force: bool) -> bool:
        """Start bringing ``h`` back if the prefetch window has room (``force``: compute needs it now)."""
        assert h.out_tr is not None and h.host_view is not None
        if not self.inflight.room_in(h.span_bytes, force):
            return False
        dst = self.transport.alloc(h.pad + h.span, h.dtype)
        h.in_tr = self.transport.copy_in(h.host_view, dst[h.pad:h.pad + h.span], h.out_tr)
        h.in_tensor = dst.as_strided(h.size, h.stride, h.pad)
        del dst
        h.in_users = storage_users(h.in_tensor)
        h.prefetched = not force
        self.inflight.add_in(h.span_bytes)
        return True

    def released(self, h: Handle, lock: "object") -> None:
        """Autograd dropped swapped handle ``h``: its host buffer goes back once its copies are done; a
        swapped-in copy it used is retired (it counts until compute has passed the use)."""
        out_tr, in_tr = h.out_tr, h.in_tr
        assert out_tr is not None and h.host is not None
        self.pool.release(h.host, lambda: out_tr.done() and (in_tr is None or in_tr.done()),
                          lambda: (out_tr.host_wait(), in_tr is None or in_tr.host_wait()))
        if in_tr is not None:
            with lock:  # type: ignore[attr-defined]
                if h.tensor is not None:
                    self.inflight.retire(h.tensor, h.span_bytes, h.in_users)
                else:
                    self.inflight.drop_unused(h.span_bytes)

    def settle(self) -> Tuple[int, int]:
        """Step end: drop what finished (queries only); the step's (swap-out waits, peak swap-in bytes)."""
        self.inflight.poll_out()
        self.inflight.poll_in()
        self.pool.sized = True  # from the first step's profile on, the pool does not grow mid-step
        return self.inflight.take_step()

    def close(self) -> None:
        self.transport.close()
        self.pool.close()
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if self.transport.pin_memory and empty_host_cache is not None:
            empty_host_cache()  # the pool's pinned buffers go back to the OS, not PyTorch's host cache
