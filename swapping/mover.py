"""How a handle's bytes move: the storage tiers (``storage.py``), the transport's copies and the
in-flight windows.

The engine decides and counts; the mover does the copying. Swap-out copies the tensor's storage
span (so views and odd strides come back bit-exact) into a host buffer of the tier the policy picks
(host pool, or disk staging that a worker writes out); swap-in allocates a destination with the
original first-element alignment and copies it back (from a spilled tensor's read-back buffer).
"""
from __future__ import annotations

from typing import Any

import torch

from .config import SwapConfig
from .handles import Handle
from .inflight import InFlight
from .storage import DISK, TieredStore
from .transport import Transport, make_transport, storage_users
from .units import parse_size


class Mover:
    """One engine's copy mechanics (called under the engine's lock, except ``released``' pool part)."""

    def __init__(self, config: SwapConfig, device: torch.device) -> None:
        self.transport: Transport = make_transport(config.transport, device, config.link_gbps)
        self.inflight = InFlight(self.transport, parse_size(config.swap_out_window) or 1,
                                 parse_size(config.prefetch_window) or 1)
        self.store = TieredStore(config, self.transport.pin_memory)
        self.pool = self.store.host
        self.levels = self.store.levels

    def swap_out(self, h: Handle, policy: Any) -> None:
        """Start copying resident ``h`` to a host buffer of the tier ``policy`` picks (disk: written out
        after); past the swap-out window compute waits first."""
        t = h.tensor
        assert t is not None
        buf, tier = self.store.acquire(h, policy)
        host = buf[:h.span_bytes].view(h.dtype)
        src = t.detach().as_strided((h.span,), (1,), t.storage_offset())
        h.out_tr = self.transport.copy_out(src, host)
        if tier == DISK:
            h.spill, h.tensor = self.store.spill(h, buf, h.out_tr), None
        else:
            h.host, h.host_view, h.tensor = buf, host, None
        del src, t
        self.inflight.add_out(h.out_tr, h.nbytes)

    def swap_in(self, h: Handle, force: bool) -> bool:
        """Start bringing ``h`` back if the prefetch window has room (``force``: compute needs it now)."""
        assert h.out_tr is not None
        if not force and not self.store.ready(h):
            return False  # its disk read is still running (started now if need be): a prefetch does not wait
        if not self.inflight.room_in(h.span_bytes, force):
            return False
        dst = self.transport.alloc(h.pad + h.span, h.dtype)
        h.in_tr = self.transport.copy_in(self.store.host_view(h), dst[h.pad:h.pad + h.span], h.out_tr)
        self.store.taken(h, h.in_tr)
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
        assert out_tr is not None
        if h.host is not None:
            self.pool.release(h.host, lambda: out_tr.done() and (in_tr is None or in_tr.done()),
                              lambda: (out_tr.host_wait(), in_tr is None or in_tr.host_wait()))
        self.store.drop(h)
        if in_tr is not None:
            with lock:  # type: ignore[attr-defined]
                if h.tensor is not None:
                    self.inflight.retire(h.tensor, h.span_bytes, h.in_users)
                else:
                    self.inflight.drop_unused(h.span_bytes)

    def read_ahead(self, h: Handle) -> None:
        """The second prefetch level: start reading spilled ``h`` from disk into host memory."""
        self.store.read_ahead(h)

    def settle(self, st: Any) -> None:
        """Step end: drop what finished (queries only); the step's swap-out waits, peak swap-in bytes
        and per-tier figures into ``st`` (a ``StepStats``)."""
        self.inflight.poll_out()
        self.inflight.poll_in()
        self.pool.sized = True  # from the first step's profile on, the pool does not grow mid-step
        st.swap_out_waits, st.peak_swapin_bytes = self.inflight.take_step()
        self.store.settle(st)

    def close(self) -> None:
        self.transport.close()
        self.store.close()
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if self.transport.pin_memory and empty_host_cache is not None:
            empty_host_cache()  # the pool's pinned buffers go back to the OS, not PyTorch's host cache
