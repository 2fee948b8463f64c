"""The LMS swap engine: saved activations go to host memory during forward and come back ahead of need.

Built on ``torch.autograd.graph.saved_tensors_hooks``:

* pack: a saved tensor on the engine's device (``candidates.py``: not a parameter, a view of one or
  autocast's cast of one; at least the policy's ``threshold`` bytes; not inside a CUDA graph capture)
  becomes a *candidate* handle, and the policy (``policy.py``) decides whether and when it is swapped:
  by default the last ``keep_last`` candidates stay pending and the oldest pending one is swapped out
  while resident saved bytes exceed ``budget``; a planner's policy swaps the tensors its plan lists.
  The copy is the mover's (``mover.py``); the tensor stays on the device until it has finished, and
  past ``swap_out_window`` bytes in flight compute waits for the oldest copies (``inflight.py``).
* unpack: compute waits for a prefetched handle's copy (an event, not a host sync); one not yet
  requested is copied at once (a stall). Each unpack starts swap-ins for the next ``prefetch`` swapped
  handles the policy names, within ``prefetch_window`` bytes: in the order learned on the first step
  (Capuchin), before that reverse pack order; the first ones already at the learned end of forward.
* one handle per tensor saved several times (same storage, geometry, version); a DTensor is swapped by
  its local shard; in-place modification after saving raises autograd's error; ``step_end`` never
  waits for the device; ``swap.disk_dir``: spills past host_limit (``storage.py``).
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lmsdp.runtime.trace_schedule import TraceSchedule, TraceWindow

from .binding import DeviceBinding, warn_cpu_once
from .candidates import is_swappable
from .config import SwapConfig
from .handles import Handle, LocalShard, Packed, modified_error
from .mover import Mover
from .policy import SwapPolicy, threshold_policy
from .stats import StepLedger, StepStats, Totals, describe, zero_stats
from .trace import Tracer
from .transport import LoopbackTransport

class SwapEngine:
    """One per rank: wraps forward (``with engine:``), rolls over with ``step_end()``.

    Decisions (what to swap, what to prefetch, what to learn) belong to ``policy``; by default the
    ``ThresholdPolicy`` built from ``config`` (threshold, budget, keep_last, prefetch)."""

    def __init__(self, config: SwapConfig, device: Union[torch.device, str],
                 policy: Optional[SwapPolicy] = None,
                 trace_window: Union[TraceWindow, TraceSchedule, None] = None) -> None:
        """``trace_window``: the steps ``config.trace`` records (default: the default schedule)."""
        self.config = config
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.enabled = bool(config.enabled)
        self.policy: SwapPolicy = policy if policy is not None else threshold_policy(config)
        self.policy.bind(self)
        self.threshold = self.policy.threshold  # read on the pack fast path
        self.recomputed_modules = 0
        self.totals = Totals()
        self.last_prefetch_order: List[int] = []
        self.last_unpack_order: List[int] = []
        self.last_swapped: List[int] = []
        self.last_stats: Dict[str, float] = zero_stats()
        self._closed = False
        self._depth = 0
        self._hooks: Optional[Any] = None
        self._global = False
        self._auto_step = False
        self._live = 0
        self._step_id = 0
        self._lock = threading.RLock()
        self.tracer: Optional[Tracer] = None
        # Memory timeline: saved candidate bytes on the device at every pack / swap / release, in traced
        # steps; the last step's samples are ``last_memory_timeline`` [(perf_counter s, bytes)].
        self.record_memory = bool(config.trace)  # its only reader is the trace (and tests / scripts)
        self._recording = False  # record_memory, and the step running now is traced
        self.last_memory_timeline: List[Tuple[float, int]] = []
        self._held = 0
        self._mem_log: List[Tuple[float, int]] = []
        self._device_log: List[Tuple[float, int]] = []
        self._ledger = StepLedger()              # transfers and waits not resolved yet (carried over)
        self._binding = DeviceBinding(device)
        if not self.enabled:
            return
        self.mover = Mover(config, device)
        self.pool = self.mover.pool
        if isinstance(self.mover.transport, LoopbackTransport) and device.type == "cpu":
            warn_cpu_once(device)
        self.tracer = Tracer(config.trace, window=trace_window) if config.trace else None
        # the allocator's own figure costs a stats query per sample: only when tracing, only on CUDA
        self._sample_device = self.tracer is not None and device.type == "cuda"
        self._reset_step()

    def _reset_step(self) -> None:
        self._step_id += 1
        self._step = StepStats()
        self._phase = "idle"                     # idle -> forward -> backward -> done
        self._dedupe: Dict[tuple, Tuple[StorageWeakRef, weakref.ref]] = {}
        self._handles: List[weakref.ref] = []    # by seq
        self._order: List[int] = []              # first unpack of each handle, in order
        self._prefetch_log: List[int] = []
        self._swapped_log: List[int] = []
        self._resident = 0
        self._outstanding = 0                    # swapped out and not yet requested back
        self._t_fw: Optional[float] = None
        self._t_bw: Optional[float] = None
        self._mem_log = []
        self._device_log = []
        self.policy.begin_step()

    @property
    def learned_order(self) -> Optional[List[int]]:
        """First-use order of saved tensors in backward, as the policy learned (or was given) it."""
        return self.policy.learned_order

    @property
    def resident_saved_bytes(self) -> int:
        return self._resident  # candidate bytes packed this step and still on the device (budgets compare)

    def __enter__(self) -> "SwapEngine":
        if not self.enabled:
            return self
        if self._closed:
            raise RuntimeError("SwapEngine used after close()")
        self._depth += 1
        if self._depth == 1 and not self._global:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
            self._t_fw = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._depth -= 1
        if self._depth == 0 and self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            if self.tracer is not None and self._t_fw is not None:
                self.tracer.span("compute", "forward", self._t_fw, time.perf_counter(), {"step": self.tracer.step})

    def install_global(self) -> None:
        """Script mode: hooks for the whole process (no ``with``) and automatic step boundaries."""
        if not self.enabled or self._global:
            return
        self._global = True
        self._auto_step = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def close(self) -> None:
        """Free the pool, join the transport's threads, write the trace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._hooks is not None:
            try:
                self._hooks.__exit__(None, None, None)
            except Exception:
                pass
            self._hooks = None
        self.mover.close()
        if self.tracer is not None:
            self.tracer.write()

    def __del__(self) -> None:
        try:
            if not self._closed and self.enabled and self._live == 0:
                self.close()
        except Exception:
            pass

    @property
    def step_open(self) -> bool:
        """True between the first pack of a step and its ``step_end()``."""
        return self.enabled and self._phase != "idle"

    @property
    def live_handles(self) -> int:
        """Handles still referenced by some autograd graph (0 once every graph has been freed)."""
        return self._live

    def handle_released(self, h: Handle) -> None:
        """Autograd dropped ``h`` (maybe on its device thread): its host buffer and held bytes go back."""
        if h.out_tr is not None:  # swapped out: its host buffer or spill file goes back
            self.mover.released(h, self._lock)
        if h.tensor is not None or h.in_tensor is not None:
            if self._recording:  # a timeline sample: ordered with the others under the lock
                with self._lock:
                    self._held_change(-h.nbytes)
            else:  # nobody reads the count now; kept so that switching the timeline on starts right
                self._held -= h.nbytes
        self._live -= 1

    def _pack(self, t: torch.Tensor) -> Packed:
        version = t._version
        if self._binding.cuda and torch.cuda.is_current_stream_capturing():
            return (t, version)  # a CUDA graph capture runs through untouched (no streams, events, steps)
        if self._phase != "forward":
            if self._phase == "backward":  # create_graph backward: leave double-backward tensors alone
                return (t, version)
            if self._phase == "done" and self._auto_step:
                self.step_end()
            self._begin_step()
        nbytes = t.nbytes
        if nbytes < self.threshold or nbytes == 0 or type(t) is not torch.Tensor:
            return (type(t) is not torch.Tensor and LocalShard.pack(self._pack, t)) or (t, version)
        if not self._binding.holds(t):
            self._binding.elsewhere(t)
            return (t, version)
        if not is_swappable(t):
            return (t, version)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, version)
        with self._lock:
            hit = self._dedupe.get(key)
            if hit is not None and not hit[0].expired():  # same storage still alive: not a reused address
                h = hit[1]()
                if h is not None:
                    return h
            st = self._step
            st.packed_tensors += 1
            self._resident += nbytes
            self._held_change(nbytes)
            if self._resident > st.peak_saved_bytes:
                st.peak_saved_bytes = self._resident
            h = Handle(self, len(self._handles), self._step_id, t, version, nbytes)
            self._live += 1
            self._handles.append(weakref.ref(h))
            self._dedupe[key] = (StorageWeakRef(storage), weakref.ref(h))  # views are new objects per save
            self.policy.on_pack(h)
            on_device = self._resident + self.mover.inflight.out_bytes  # swap-outs count until copied
            if on_device > st.peak_resident_bytes:
                st.peak_resident_bytes = on_device
            if len(self._handles) == self.policy.forward_length:  # forward end as learned: first swap-ins
                self._prefetch_after(None)
            return h

    def _begin_step(self) -> None:
        self._phase = "forward"
        self._recording = self.record_memory and (self.tracer is None or self.tracer.begin_step(self._step_id))
        self._binding.check_current()
        self.mover.transport.step_begin()
        if self._t_fw is None:
            self._t_fw = time.perf_counter()

    def swap_out(self, h: Handle) -> None:
        """Start moving resident handle ``h`` to host memory (called by the policy, under the lock)."""
        self.mover.swap_out(h, self.policy)
        self._resident -= h.nbytes
        self._held_change(-h.nbytes)
        self._outstanding += 1
        self._step.swap_out_bytes += h.span_bytes
        self._step.swapped_tensors += 1
        self._swapped_log.append(h.seq)
        self._ledger.transfer("swap-out", h.out_tr, h.seq)

    def _unpack(self, packed: Packed) -> torch.Tensor:
        if type(packed) is LocalShard:  # type: ignore[comparison-overlap]
            return packed.wrap(self._unpack(packed.inner))  # type: ignore[union-attr]
        if type(packed) is tuple:
            t, version = packed
            if t._version != version:
                raise modified_error(t, version)
            return t
        h: Handle = packed  # type: ignore[assignment]
        orig = h.orig()
        if orig is not None and orig._version != h.version:
            raise modified_error(orig, h.version)
        with self._lock:
            current = h.step_id == self._step_id
            if current and self._phase != "backward":
                self._begin_backward()
            if h.tensor is not None:  # resident, or already swapped in
                self._first_use(h, current)
                return h.tensor
            if h.in_tr is None:
                self._step.stalls += 1
                self._swap_in(h, current, force=True)
            self._first_use(h, current)  # queue the next copies before compute waits for this one
            assert h.in_tr is not None
            self._ledger.wait(self.mover.transport.compute_wait(h.in_tr), h.prefetched)
            h.tensor, h.in_tensor = h.in_tensor, None
            return h.tensor  # type: ignore[return-value]

    def _first_use(self, h: Handle, current: bool) -> None:
        if current and not h.used:
            h.used = True
            self._order.append(h.seq)
            self._prefetch_after(h.seq)

    def _swap_in(self, h: Handle, current: bool = True, force: bool = False) -> bool:
        """Start bringing ``h`` back if the prefetch window has room (``force``: compute needs it now)."""
        if not self.mover.swap_in(h, force):
            return False
        if current:
            self._outstanding -= 1
        self._held_change(h.nbytes)
        self._step.swap_in_bytes += h.span_bytes
        self._step.swap_in_tensors += 1
        self._ledger.transfer("swap-in", h.in_tr, h.seq)
        return True

    def _held_change(self, delta: int) -> None:
        """Saved bytes on the device went up or down: one timeline sample (a tuple append)."""
        held = self._held = self._held + delta
        if self._recording:
            t = time.perf_counter()
            self._mem_log.append((t, held))
            if self._sample_device:
                self._device_log.append((t, torch.cuda.memory_allocated(self.device)))

    def _prefetch_after(self, seq: Optional[int]) -> None:
        """Keep swap-ins going for the policy's next ``prefetch`` swapped handles after ``seq`` (None: forward end)."""
        limit = self.policy.prefetch
        if limit <= 0 or self._outstanding <= 0:
            return
        # the next ``limit`` swapped handles in the policy's order, those on their way back included (the window
        # slides by one per use); with a disk tier (levels 2) the ``limit`` after them are read from disk ahead
        window, reach = 0, limit * self.mover.levels
        for s in self.policy.prefetch_candidates(seq):
            if s >= len(self._handles):
                continue
            other = self._handles[s]()
            if other is None or other.out_tr is None or other.used:
                continue  # gone, never swapped (resident), or already used this step
            window += 1
            fresh = window <= limit and other.in_tr is None and other.tensor is None
            if fresh and self._swap_in(other):
                self._prefetch_log.append(s)
            elif window > limit or fresh:  # the second level, or the prefetch window (bytes) is full
                self.mover.read_ahead(other)
                window = max(window, limit)
            if window >= reach or self._outstanding <= 0:
                break

    def _begin_backward(self) -> None:
        self._phase = "backward"
        self.policy.backward_begins()
        if self._t_bw is None:
            self._t_bw = time.perf_counter()
        with contextlib.suppress(RuntimeError):  # unpacked outside a backward pass (grad_fn._saved_*)
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._phase = "done"
        if self.tracer is not None and self._t_bw is not None:
            self.tracer.span("compute", "backward", self._t_bw, time.perf_counter(), {"step": self.tracer.step})
        self._t_bw = None

    def step_end(self) -> Dict[str, float]:
        """Close the step: resolve timings, learn the access order, return this step's stats."""
        if not self.enabled:
            return zero_stats()
        with self._lock:
            st = self._step
            tracer = self.tracer if self.tracer is not None and self.tracer.recording else None
            self._ledger = self._ledger.close(st, tracer, tracer.step if tracer else self._step_id, block=False)
            self.mover.settle(st)  # swap-out waits, peak swap-in bytes, per-tier figures
            self._binding.check_step(st.packed_tensors)
            if tracer is not None:
                tracer.memory(self._mem_log, self._device_log)
            self.last_memory_timeline = self._mem_log
            st.finish(self._resident, self.pool.total_bytes, self.recomputed_modules, self.device)
            self.policy.step_end(self._order, len(self._handles))
            self.last_prefetch_order = self._prefetch_log
            self.last_unpack_order = self._order
            self.last_swapped = self._swapped_log
            self.totals.add(st)
            self.last_stats = st.as_dict()
            self._reset_step()
            return dict(self.last_stats)

    def summary(self) -> Dict[str, float]:
        """Totals over all steps (for the end-of-run table)."""
        return self.totals.summary(self.pool if self.enabled else None)

    def describe(self) -> str:
        return describe(self.summary())  # one line for logs

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply cost-aware recomputation per ``config.recompute`` (identity when None or disabled)."""
        if not self.enabled or not self.config.recompute:
            return model
        from .recompute import apply_recompute
        self.recomputed_modules += apply_recompute(model, self.config.recompute)
        return model
