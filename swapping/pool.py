"""Host memory pool for swapped tensors: size-classed (pinned on CUDA) uint8 buffers reused across steps.

Steady-state training swaps the same set of sizes every step, so buffers are cached per size class and
never returned to the OS until ``close()``; a new (pinned) allocation only happens when a class runs dry.
The first step sizes the pool: once the engine marks it ``sized``, a class that runs dry while a buffer
of it is still read by a copy waits for that copy instead of allocating (a pinned allocation inside the
pack hook is an implicit device sync, torchtune#2076). Pinned classes are powers of two, which is what
PyTorch's host allocator reserves for any request, so ``total_bytes`` is the real pinned footprint.
``host_limit`` caps the total, raising :class:`HostMemoryLimitError` before the OS has to kill anything.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .units import format_size

MIN_CLASS = 4096


class HostMemoryLimitError(MemoryError):
    """The swap engine needed more host memory than ``SwapConfig.host_limit`` allows."""

    def __init__(self, needed: int, limit: int, in_use: int, request: int) -> None:
        self.needed, self.limit, self.in_use, self.request = needed, limit, in_use, request
        super().__init__(
            f"swap host pool needs {format_size(needed)} ({needed} bytes) more, limit {format_size(limit)} "
            f"({limit} bytes) with {format_size(in_use)} in use for swapped tensors and a buffer of "
            f"{format_size(request)} requested; raise swap.host_limit, raise swap.budget/threshold, "
            f"or lower the batch size")


def size_class(nbytes: int, power_of_two: bool = False) -> int:
    """Round ``nbytes`` up to a size class, >= 4 KiB: 4 classes per power of two (at most 25 % waste),
    or the power of two itself (pinned memory: the host allocator rounds every block to one)."""
    if nbytes <= MIN_CLASS:
        return MIN_CLASS
    upper = 1 << (nbytes - 1).bit_length()
    if power_of_two:
        return upper
    step = upper // 8
    return -(-nbytes // step) * step


def aligned_empty(nbytes: int, align: int, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` whose first byte sits at a multiple of ``align`` (``O_DIRECT`` I/O).
    Pinned blocks are page-aligned already (over-allocating would double a power-of-two pinned class)."""
    plain = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
    if plain.data_ptr() % align == 0:
        return plain
    del plain
    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=pin_memory)
    off = (-raw.data_ptr()) % align
    return raw[off:off + nbytes]


class HostPool:
    """Thread-safe cache of host buffers keyed by size class.

    ``release(buf, done, wait)`` takes an optional completion predicate: a buffer still read by an
    in-flight copy is parked and only reused once ``done()`` is true (or after ``wait()``, once sized).
    """

    def __init__(self, pin_memory: bool = False, limit: Optional[int] = None,
                 power_of_two: Optional[bool] = None, align: int = 0) -> None:
        self.pin_memory = pin_memory
        self.align = align        # buffers start at a multiple of it (the disk tier's staging: O_DIRECT)
        self.power_of_two = pin_memory if power_of_two is None else power_of_two
        self.limit = limit
        self.sized = False        # set by the engine after the first step
        self.copy_waits = 0       # times a dry class waited for a parked buffer instead of allocating
        self._free: Dict[int, List[torch.Tensor]] = defaultdict(list)
        self._parked: List[Tuple[torch.Tensor, Callable[[], bool], Optional[Callable[[], object]]]] = []
        self._lock = threading.Lock()
        self.total_bytes = 0      # everything the pool holds (free + in use)
        self.in_use_bytes = 0
        self.allocations = 0      # buffers ever allocated: constant in steady state
        self.peak_in_use_bytes = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (its numel is the size class)."""
        cls = size_class(nbytes, self.power_of_two)
        with self._lock:
            self._unpark()
            free = self._free.get(cls)
            if not free and self.sized:
                self._wait_parked(cls)
                free = self._free.get(cls)
            if free:
                buf = free.pop()
            else:
                if self.limit is not None and self.total_bytes + cls > self.limit:
                    self._trim_locked()
                    if self.total_bytes + cls > self.limit:
                        raise HostMemoryLimitError(self.total_bytes + cls - self.limit, self.limit,
                                                   self.in_use_bytes, cls)
                buf = (aligned_empty(cls, self.align, self.pin_memory) if self.align
                       else torch.empty(cls, dtype=torch.uint8, pin_memory=self.pin_memory))
                self.total_bytes += cls
                self.allocations += 1
            self.in_use_bytes += cls
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            return buf

    def reserve(self, sizes: List[int]) -> int:
        """Allocate a free buffer for each of ``sizes`` now (before step 1, outside any pack hook: a
        pinned allocation there is an implicit device sync); stops quietly at ``limit`` (the step then
        allocates or raises as usual). Returns the bytes added to the pool."""
        added = 0
        with self._lock:
            for nbytes in sorted(sizes, reverse=True):
                cls = size_class(nbytes, self.power_of_two)
                if self.limit is not None and self.total_bytes + cls > self.limit:
                    continue
                self._free[cls].append(torch.empty(cls, dtype=torch.uint8, pin_memory=self.pin_memory))
                self.total_bytes += cls
                self.allocations += 1
                added += cls
        return added

    def release(self, buf: torch.Tensor, done: Optional[Callable[[], bool]] = None,
                wait: Optional[Callable[[], object]] = None) -> None:
        """Give ``buf`` back; if ``done`` says a copy still reads it, reuse waits until it finishes
        (``wait`` blocks until then)."""
        with self._lock:
            self.in_use_bytes -= buf.numel()
            if done is not None and not done():
                self._parked.append((buf, done, wait))
            else:
                self._free[buf.numel()].append(buf)

    def _unpark(self) -> None:
        if self._parked:
            still = []
            for entry in self._parked:
                (self._free[entry[0].numel()].append(entry[0]) if entry[1]() else still.append(entry))
            self._parked = still

    def _wait_parked(self, cls: int) -> None:
        """Wait for the oldest parked buffer of ``cls`` (its copy only), if there is one."""
        for i, (buf, _done, wait) in enumerate(self._parked):
            if buf.numel() == cls and wait is not None:
                wait()
                del self._parked[i]
                self._free[cls].append(buf)
                self.copy_waits += 1
                return

    def _trim_locked(self) -> None:
        for cls, bufs in self._free.items():
            self.total_bytes -= cls * len(bufs)
            bufs.clear()

    def trim(self) -> None:
        """Return every cached free buffer to the OS."""
        with self._lock:
            self._unpark()
            self._trim_locked()

    def close(self) -> None:
        """Drop the cache (buffers still in use are freed when their handles die)."""
        self.trim()
