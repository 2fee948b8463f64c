"""Where swapped bytes live, behind the transport: one storage interface with tiers.

* host: the size-classed host pool (``pool.py``), capped by ``swap.host_limit``;
* disk (``swap.disk_dir``): spill files (``disk.py``) below it. A tensor bound for disk still crosses
  the link into a host *staging* buffer (its own pool, bounded by the windows below, not by
  ``host_limit``), which a worker thread writes out and frees; coming back, a worker reads it into a
  staging buffer ahead of need (the engine's second prefetch level), and the host -> device copy
  starts from there.

The policy picks the tier (``SwapPolicy.tier``: host until ``host_limit`` is reached, then disk, by
default); the store does the bookkeeping. Disk writes in flight are bounded by ``swap_out_window``
(past it compute waits for the oldest write) and read-aheads by ``prefetch_window``.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

import torch

from .config import SwapConfig
from .disk import ALIGN, DiskTier, DiskTierError, Spill
from .handles import Handle
from .pool import HostMemoryLimitError, HostPool
from .units import parse_size

HOST, DISK = "host", "disk"


def _zero_step() -> Dict[str, Any]:
    return {"host_tier_bytes": 0, "disk_stall_ms": 0.0, "disk_write_waits": 0, "disk_reads_ahead": 0,
            "disk_reads_forced": 0}


class TieredStore:
    """The host pool and, with a ``disk_dir``, the disk tier below it (called under the engine's lock,
    except ``drop``)."""

    def __init__(self, config: SwapConfig, pin_memory: bool) -> None:
        self.host = HostPool(pin_memory=pin_memory, limit=parse_size(config.host_limit))
        self.disk: Optional[DiskTier] = None
        self.staging: Optional[HostPool] = None
        if config.disk_limit and not config.disk_dir:
            raise DiskTierError("swap.disk_limit: set without swap.disk_dir; allowed: a disk_dir to spill to, "
                                "or no disk_limit")
        if config.disk_dir:
            self.disk = DiskTier(config.disk_dir, parse_size(config.disk_limit), bool(config.verify))
            self.staging = HostPool(pin_memory=pin_memory, align=ALIGN)
        self.levels = 2 if self.disk is not None else 1  # prefetch levels: (disk -> host,) host -> device
        self.out_window = parse_size(config.swap_out_window) or 1
        self.in_window = parse_size(config.prefetch_window) or 1
        self._writing: Deque[Tuple[Spill, int]] = deque()
        self._writing_bytes = 0
        self._reading_bytes = 0          # read ahead and not yet taken by a swap-in
        self._lock = threading.Lock()
        self._step = _zero_step()

    # ------------------------------------------------------------------------------------ swap-out
    def acquire(self, h: Handle, policy: Any) -> Tuple[torch.Tensor, str]:
        """A host buffer for ``h``'s swap-out and the tier it goes to."""
        n = h.span_bytes
        if self.disk is None or policy.tier(h) != DISK:
            try:
                buf = self.host.acquire(n)
                self._step["host_tier_bytes"] += n
                return buf, HOST
            except HostMemoryLimitError:
                if self.disk is None:
                    raise
        assert self.staging is not None and self.disk is not None
        self.disk.check()
        self._wait_writes(n)
        return self.staging.acquire(n), DISK

    def spill(self, h: Handle, buf: torch.Tensor, ready: Any) -> Spill:
        """Write ``buf`` (``h``'s bytes once ``ready`` is done) to the disk tier; the buffer goes back after."""
        assert self.disk is not None and self.staging is not None
        staging = self.staging
        sp = self.disk.spill(buf, h.span_bytes, ready.host_wait, lambda: staging.release(buf))
        self._writing.append((sp, h.span_bytes))
        self._writing_bytes += h.span_bytes
        return sp

    def _wait_writes(self, nbytes: int) -> None:
        """Settle finished writes; past ``swap_out_window`` bytes in flight, wait for the oldest."""
        while self._writing and (self._writing[0][0].written.is_set()
                                 or self._writing_bytes + nbytes > self.out_window):
            sp, n = self._writing.popleft()
            if not sp.written.is_set():
                self._step["disk_write_waits"] += 1
                sp.written.wait()
            self._writing_bytes -= n

    # ------------------------------------------------------------------------------------- swap-in
    def read_ahead(self, h: Handle) -> None:
        """Start reading spilled ``h`` back into host staging (within ``prefetch_window`` bytes)."""
        sp = h.spill
        if sp is None or sp.read_done is not None or self.disk is None or self.staging is None:
            return
        with self._lock:
            if self._reading_bytes and self._reading_bytes + sp.nbytes > self.in_window:
                return
            self._reading_bytes += sp.nbytes
        self._step["disk_reads_ahead"] += 1
        self.disk.read_ahead(sp, self.staging.acquire(sp.nbytes))

    def ready(self, h: Handle) -> bool:
        """Are ``h``'s bytes in host memory (host tier, or its disk read has finished)? A spilled one
        whose read has not started is read ahead now."""
        sp = h.spill
        if sp is None:
            return True
        if sp.read_done is None:
            self.read_ahead(h)
        return sp.read_done is not None and sp.read_done.is_set()

    def host_view(self, h: Handle) -> torch.Tensor:
        """``h``'s bytes in host memory as its dtype (a spilled one is read now if no read-ahead has
        finished: compute waits, counted as ``disk_stall_ms``)."""
        sp = h.spill
        if sp is None:
            assert h.host_view is not None
            return h.host_view
        assert self.disk is not None and self.staging is not None
        if sp.read_done is None:
            self._step["disk_reads_forced"] += 1
            self.disk.read_ahead(sp, self.staging.acquire(sp.nbytes))
        else:
            with self._lock:
                self._reading_bytes -= sp.nbytes
        t0 = time.perf_counter()
        buf = self.disk.fetch(sp)
        self._step["disk_stall_ms"] += (time.perf_counter() - t0) * 1e3
        return buf[:sp.nbytes].view(h.dtype)

    def taken(self, h: Handle, in_tr: Any) -> None:
        """The host -> device copy of spilled ``h`` was queued: its staging buffer goes back after it."""
        sp = h.spill
        if sp is None or self.staging is None or sp.read_buf is None:
            return
        buf, sp.read_buf = sp.read_buf, None
        self.staging.release(buf, in_tr.done, in_tr.host_wait)

    def drop(self, h: Handle) -> None:
        """Autograd dropped spilled ``h``: its file (and a read-ahead nobody took) go, on a worker."""
        sp = h.spill
        if sp is None or self.disk is None or self.staging is None:
            return
        staging, lock = self.staging, self._lock

        def done() -> None:
            if sp.read_buf is not None:  # read ahead, never taken
                with lock:
                    self._reading_bytes -= sp.nbytes
                staging.release(sp.read_buf)
                sp.read_buf = None
        self.disk.drop(sp, done)

    # ---------------------------------------------------------------------------------- accounting
    def settle(self, st: Any) -> None:
        """Step end: this step's per-tier figures into ``st`` (a ``StepStats``)."""
        st.host_tier_bytes = self._step["host_tier_bytes"]
        st.disk_stall_ms = self._step["disk_stall_ms"]
        st.disk_write_waits = self._step["disk_write_waits"]
        st.disk_reads_ahead, st.disk_reads_forced = self._step["disk_reads_ahead"], self._step["disk_reads_forced"]
        self._step = _zero_step()
        if self.disk is None:
            return
        self._wait_writes(0)
        wb, ws, rb, rs = self.disk.take()
        st.disk_write_bytes, st.disk_read_bytes = wb, rb
        st.disk_write_ms, st.disk_read_ms = ws * 1e3, rs * 1e3
        st.disk_peak_bytes = self.disk.peak_bytes
        st.disk_staging_bytes = self.staging.total_bytes if self.staging is not None else 0
        self.disk.peak_bytes = self.disk.used_bytes

    def close(self) -> None:
        self.host.close()
        if self.disk is not None:
            self.disk.close()
        if self.staging is not None:
            self.staging.close()
