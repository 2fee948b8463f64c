"""The LMS swap engine: saved activations go to host memory during forward and come back ahead of need.

Built on ``torch.autograd.graph.saved_tensors_hooks``:

* pack: a saved tensor on the engine's device (not a parameter or a view of one, plain strided, at least
  the policy's ``threshold`` bytes) becomes a *candidate* handle, and the policy (``policy.py``) decides
  whether and when it is swapped: by default the last ``keep_last`` candidates stay pending and, when a
  newer one arrives, the oldest pending one is swapped out if the resident saved bytes exceed
  ``budget``; a planner's policy swaps the tensors its plan lists. Swap-out copies the tensor's storage
  span (so views and odd strides come back bit-exact) into a pooled host buffer on the transport's
  swap-out stream; the device tensor is released only once the copy has completed (record_stream on
  CUDA, the worker's reference on loopback).
* unpack: a prefetched handle waits on its event; one not yet requested is copied at once (a stall).
  Each unpack starts swap-ins for the next ``prefetch`` swapped handles the policy names: in the order
  learned on the first step (Capuchin); before that, reverse pack order. Once the learned forward length
  is reached, the first handles of the learned order are prefetched already at the end of forward.
* the same tensor saved several times (same storage, geometry and version) is one handle; in-place
  modification after saving raises autograd's usual error (hooks disable autograd's own check).
"""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from lmsdp.runtime.trace_schedule import TraceSchedule, TraceWindow

from .config import SwapConfig
from .policy import SwapPolicy, threshold_policy
from .pool import HostPool
from .stats import StepStats, Totals, zero_stats
from .trace import MEMORY_COUNTER, Tracer
from .transport import LoopbackTransport, Transfer, Transport, make_transport
from .units import format_size, parse_size

_ALIGN = 512  # bytes of the first element's address alignment preserved on swap-in
_STALL_SPAN_MS = 0.01  # stalls shorter than this (an already finished copy) are not drawn in the trace
_cpu_warned = False


def _warn_cpu_once(device: torch.device) -> None:
    global _cpu_warned
    if not _cpu_warned:
        _cpu_warned = True
        warnings.warn(f"lmsdp swap: the engine runs on {device} with the loopback transport; swapped "
                      "tensors stay in host memory, so swapping saves no memory here (it only exercises "
                      "the swap paths)", RuntimeWarning, stacklevel=3)


def _modified_error(t: torch.Tensor, saved: int) -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {saved} instead "
        "(detected by the lmsdp swap engine's unpack hook)")


def _span(t: torch.Tensor) -> int:
    """Elements of storage covered by ``t`` from its first element (numel for dense tensors)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


class _Handle:
    """What autograd stores instead of a candidate tensor."""

    __slots__ = ("engine", "seq", "step_id", "dtype", "size", "stride", "span", "pad", "nbytes",
                 "span_bytes", "tensor", "orig", "version", "host", "host_view", "out_tr", "in_tr",
                 "in_tensor", "used", "__weakref__")

    def __init__(self, engine: "SwapEngine", seq: int, t: torch.Tensor, version: int, nbytes: int) -> None:
        self.engine = engine
        self.seq = seq
        self.step_id = engine._step_id
        self.dtype, self.size, self.stride = t.dtype, t.shape, t.stride()
        self.span = _span(t)
        self.span_bytes = self.span * t.element_size()
        self.pad = (t.data_ptr() % _ALIGN) // t.element_size()
        self.nbytes = nbytes
        self.tensor: Optional[torch.Tensor] = t          # resident original, or swapped-in copy
        self.orig = weakref.ref(t)                      # for the version check
        self.version = version
        self.host: Optional[torch.Tensor] = None
        self.host_view: Optional[torch.Tensor] = None
        self.out_tr: Optional[Transfer] = None
        self.in_tr: Optional[Transfer] = None
        self.in_tensor: Optional[torch.Tensor] = None
        self.used = False
        engine._live += 1

    def __del__(self) -> None:
        try:
            eng = self.engine
            if self.host is not None:
                out_tr, in_tr = self.out_tr, self.in_tr
                eng.pool.release(self.host, lambda: out_tr.done() and (in_tr is None or in_tr.done()))
            if self.tensor is not None or self.in_tensor is not None:
                # autograd freed the saved tensor (maybe on its device thread)
                if eng._recording:  # a timeline sample: ordered with the others under the lock
                    with eng._lock:
                        eng._held_change(-self.nbytes)
                else:  # nobody reads the count now; kept so that switching the timeline on starts right
                    eng._held -= self.nbytes
            eng._live -= 1
        except Exception:  # interpreter shutdown
            pass


Packed = Union[_Handle, Tuple[torch.Tensor, int]]


class SwapEngine:
    """One per rank: wraps forward (``with engine:``), rolls over with ``step_end()``.

    Decisions (what to swap, what to prefetch, what to learn) belong to ``policy``; by default the
    ``ThresholdPolicy`` built from ``config`` (threshold, budget, keep_last, prefetch)."""

    def __init__(self, config: SwapConfig, device: Union[torch.device, str],
                 policy: Optional[SwapPolicy] = None,
                 trace_window: Union[TraceWindow, TraceSchedule, None] = None) -> None:
        """``trace_window``: which steps ``config.trace`` records (see ``Tracer``; default: the
        default schedule over the engine's own step count)."""
        self.config = config
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.enabled = bool(config.enabled)
        self._device_index = -1 if device.type == "cpu" else (device.index or 0)
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
        # Memory timeline (mechanism, cheap): candidate bytes the saved tensors hold on the device,
        # sampled at every pack / swap-out / swap-in / release when ``record_memory`` (on with
        # ``trace``, in its traced steps); the last finished step's samples are ``last_memory_timeline``
        # [(perf_counter s, bytes)] and, with ``trace``, counter events in the trace.
        self.record_memory = bool(config.trace)  # its only reader is the trace (and tests / scripts)
        self._recording = False  # record_memory, and the step running now is traced
        self.last_memory_timeline: List[Tuple[float, int]] = []
        self._held = 0
        self._mem_log: List[Tuple[float, int]] = []
        self._device_log: List[Tuple[float, int]] = []
        if not self.enabled:
            return
        self.transport: Transport = make_transport(config.transport, device)
        if isinstance(self.transport, LoopbackTransport) and device.type == "cpu":
            _warn_cpu_once(device)
        self.pool = HostPool(pin_memory=self.transport.pin_memory, limit=parse_size(config.host_limit))
        self.tracer = Tracer(config.trace, window=trace_window) if config.trace else None
        # the allocator's own figure costs a stats query per sample: only when tracing, only on CUDA
        self._sample_device = self.tracer is not None and device.type == "cuda"
        self._reset_step()

    # ------------------------------------------------------------------------------------ lifecycle
    def _reset_step(self) -> None:
        self._step_id += 1
        self._step = StepStats()
        self._phase = "idle"                     # idle -> forward -> backward -> done
        self._dedupe: Dict[tuple, Tuple[weakref.ref, Optional[weakref.ref]]] = {}
        self._handles: List[weakref.ref] = []    # by seq
        self._order: List[int] = []              # first unpack of each handle, in order
        self._prefetch_log: List[int] = []
        self._swapped_log: List[int] = []
        self._transfers: List[Tuple[str, Transfer, int]] = []
        self._stall_thunks: List[Callable[[], float]] = []
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
        """Candidate bytes packed this step and still on the device (what budgets compare against)."""
        return self._resident

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
        self.transport.close()
        self.pool.close()
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

    # ----------------------------------------------------------------------------------------- pack
    def _pack(self, t: torch.Tensor) -> Packed:
        version = t._version
        if self._phase != "forward":
            if self._phase == "backward":  # create_graph backward: leave double-backward tensors alone
                return (t, version)
            if self._phase == "done" and self._auto_step:
                self._auto_roll()
            self._begin_step()
        nbytes = t.nbytes
        if nbytes < self.threshold or nbytes == 0 or not self._on_device(t) or type(t) is not torch.Tensor:
            return (t, version)  # the fast path: one tuple, no bookkeeping
        if t.layout != torch.strided or (t.requires_grad and t.is_leaf):
            return (t, version)
        base = t._base
        if base is not None and base.requires_grad and base.is_leaf:
            return (t, version)  # a view of a parameter
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, version)
        with self._lock:
            hit = self._dedupe.get(key)
            if hit is not None and hit[0]() is not None:
                h = hit[1]()
                if h is not None:
                    return h
            st = self._step
            st.packed_tensors += 1
            self._resident += nbytes
            self._held_change(nbytes)
            if self._resident > st.peak_saved_bytes:
                st.peak_saved_bytes = self._resident
            h = _Handle(self, len(self._handles), t, version, nbytes)
            self._handles.append(weakref.ref(h))
            self._dedupe[key] = (weakref.ref(t), weakref.ref(h))
            self.policy.on_pack(h)
            if len(self._handles) == self.policy.forward_length:  # forward end as learned: first swap-ins
                self._prefetch_after(None)
            return h

    def _on_device(self, t: torch.Tensor) -> bool:
        if self._device_index < 0:
            return t.is_cpu
        return t.is_cuda and t.get_device() == self._device_index

    def _begin_step(self) -> None:
        self._phase = "forward"
        self._recording = self.record_memory and (self.tracer is None or self.tracer.begin_step(self._step_id))
        self.transport.step_begin()
        if self._t_fw is None:
            self._t_fw = time.perf_counter()

    def swap_out(self, h: _Handle) -> None:
        """Start moving resident handle ``h`` to host memory (called by the policy, under the lock)."""
        t = h.tensor
        assert t is not None
        buf = self.pool.acquire(h.span_bytes)
        host = buf[:h.span_bytes].view(h.dtype)
        src = t.detach().as_strided((h.span,), (1,), t.storage_offset())
        h.out_tr = self.transport.copy_out(src, host)
        h.host, h.host_view, h.tensor = buf, host, None
        del src, t
        self._resident -= h.nbytes
        self._held_change(-h.nbytes)
        self._outstanding += 1
        self._step.swap_out_bytes += h.span_bytes
        self._step.swapped_tensors += 1
        self._swapped_log.append(h.seq)
        self._transfers.append(("swap-out", h.out_tr, h.seq))

    # --------------------------------------------------------------------------------------- unpack
    def _unpack(self, packed: Packed) -> torch.Tensor:
        if type(packed) is tuple:
            t, version = packed
            if t._version != version:
                raise _modified_error(t, version)
            return t
        h: _Handle = packed  # type: ignore[assignment]
        orig = h.orig()
        if orig is not None and orig._version != h.version:
            raise _modified_error(orig, h.version)
        with self._lock:
            current = h.step_id == self._step_id
            if current and self._phase != "backward":
                self._begin_backward()
            if h.tensor is not None:  # resident, or already swapped in
                if current and not h.used:
                    h.used = True
                    self._order.append(h.seq)
                    self._prefetch_after(h.seq)
                return h.tensor
            st = self._step
            if h.in_tr is None:
                st.stalls += 1
                self._swap_in(h, current)
            elif not h.in_tr.done():
                st.late_prefetches += 1
            if current and not h.used:
                h.used = True
                self._order.append(h.seq)
                self._prefetch_after(h.seq)  # queue the next copies before blocking on this one
            assert h.in_tr is not None
            self._stall_thunks.append(self.transport.compute_wait(h.in_tr))
            h.tensor, h.in_tensor = h.in_tensor, None
            return h.tensor  # type: ignore[return-value]

    def _swap_in(self, h: _Handle, current: bool = True) -> None:
        assert h.out_tr is not None and h.host_view is not None
        dst = self.transport.alloc(h.pad + h.span, h.dtype)
        h.in_tr = self.transport.copy_in(h.host_view, dst[h.pad:h.pad + h.span], h.out_tr)
        h.in_tensor = dst.as_strided(h.size, h.stride, h.pad)
        if current:
            self._outstanding -= 1
        self._held_change(h.nbytes)
        self._step.swap_in_bytes += h.span_bytes
        self._step.swap_in_tensors += 1
        self._transfers.append(("swap-in", h.in_tr, h.seq))

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
        # The window is the next ``limit`` swapped handles in the policy's order, counting those
        # already on their way back: it slides by one per use instead of growing by ``limit``
        # (issuing ``limit`` new copies per unpack brought most of a step's swapped bytes back to the
        # device at once in backward: 61 of 72 MiB for a ResNet-18 at prefetch 2).
        window = 0
        for s in self.policy.prefetch_candidates(seq):
            if s >= len(self._handles):
                continue
            other = self._handles[s]()
            if other is None or other.out_tr is None or other.used:
                continue  # gone, never swapped (resident), or already used this step
            window += 1
            if other.in_tr is None and other.tensor is None:
                self._swap_in(other)
                self._prefetch_log.append(s)
            if window >= limit or self._outstanding <= 0:
                break

    def _begin_backward(self) -> None:
        self._phase = "backward"
        self.policy.backward_begins()
        if self._t_bw is None:
            self._t_bw = time.perf_counter()
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        except RuntimeError:
            pass  # unpacked outside a backward pass (e.g. grad_fn._saved_*)

    def _on_backward_end(self) -> None:
        self._phase = "done"
        if self.tracer is not None and self._t_bw is not None:
            self.tracer.span("compute", "backward", self._t_bw, time.perf_counter(), {"step": self.tracer.step})
        self._t_bw = None

    # ---------------------------------------------------------------------------------------- steps
    def step_end(self) -> Dict[str, float]:
        """Close the step: resolve timings, learn the access order, return this step's stats."""
        if not self.enabled:
            return zero_stats()
        with self._lock:
            st = self._step
            for kind, tr, seq in self._transfers:
                start, end = tr.span()
                ms = (end - start) * 1e3
                if kind == "swap-out":
                    st.swap_out_ms += ms
                else:
                    st.swap_in_ms += ms
                if self.tracer is not None:
                    self.tracer.span(kind, f"{kind} #{seq}", start, end, {"bytes": tr.nbytes, "step": self.tracer.step})
            waits = [thunk() for thunk in self._stall_thunks]
            st.stall_ms = float(sum(waits))
            if self.tracer is not None and self.tracer.recording:
                self._trace_memory_and_stalls(waits)
            self.last_memory_timeline = self._mem_log
            st.resident_saved_bytes = self._resident
            st.host_pool_bytes = self.pool.total_bytes
            st.recomputed_modules = self.recomputed_modules
            if self.device.type == "cuda":
                st.max_memory_allocated = int(torch.cuda.max_memory_allocated(self.device))
                torch.cuda.reset_peak_memory_stats(self.device)
            st.finish()
            self.policy.step_end(self._order, len(self._handles))
            self.last_prefetch_order = self._prefetch_log
            self.last_unpack_order = self._order
            self.last_swapped = self._swapped_log
            self.totals.add(st)
            self.last_stats = st.as_dict()
            self._reset_step()
            return dict(self.last_stats)

    def _trace_memory_and_stalls(self, waits: List[float]) -> None:
        """This step's memory samples as counter events and its swap-in stalls as spans (step end)."""
        tracer, step = self.tracer, self.tracer.step
        assert tracer is not None
        for t, held in self._mem_log:
            tracer.counter(MEMORY_COUNTER, t, {"resident_bytes": held})
        for t, allocated in self._device_log:
            tracer.counter("device memory allocated", t, {"device_allocated_bytes": allocated})
        for thunk, ms in zip(self._stall_thunks, waits):
            start = getattr(thunk, "start", None)
            if ms >= _STALL_SPAN_MS and start is not None:
                t0 = start()
                tracer.span("stall", "swap-in stall", t0, t0 + ms / 1e3, {"ms": ms, "step": step})
        tracer.flush()  # a killed run keeps its recorded steps

    def _auto_roll(self) -> None:
        self.step_end()

    def summary(self) -> Dict[str, float]:
        """Totals over all steps (for the end-of-run table)."""
        if not self.enabled:
            return dict(Totals().as_dict(), host_pool_allocations=0)
        out = self.totals.as_dict()
        out["host_pool_bytes"] = self.pool.total_bytes
        out["host_pool_allocations"] = self.pool.allocations
        return out

    def describe(self) -> str:
        """One line for logs."""
        s = self.summary()
        return (f"steps={s['steps']} swapped_out={s['swap_out_bytes']} ({format_size(s['swap_out_bytes'])}) "
                f"swapped_in={s['swap_in_bytes']} tensors={s['swapped_tensors']} stalls={s['stalls']} "
                f"stall_ms={s['stall_ms']:.1f} hidden={s['hidden_frac']:.2f} "
                f"host_pool={format_size(s['host_pool_bytes'])}")

    # ------------------------------------------------------------------------------------ recompute
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply cost-aware recomputation per ``config.recompute`` (identity when None or disabled)."""
        if not self.enabled or not self.config.recompute:
            return model
        from .recompute import apply_recompute
        self.recomputed_modules += apply_recompute(model, self.config.recompute)
        return model
