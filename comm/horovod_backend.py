"""Horovod backend: ``hvd.DistributedOptimizer`` (per-parameter hooks launch ``allreduce_async_`` as
each gradient is accumulated; Horovod's background thread fuses them up to the fusion threshold every
cycle), ``broadcast_parameters`` for the model and rank 0's optimizer state as an object.

Works under the MPI controller (``mpirun``) and the Gloo controller (``horovodrun --gloo``); a single
process (not launched) is a world of one. Knobs reach Horovod through its environment variables,
which it reads in ``hvd.init()``: HOROVOD_FUSION_THRESHOLD, HOROVOD_CYCLE_TIME, HOROVOD_TIMELINE (DYNAMIC:
started and stopped with the trace window, see ``HorovodBackend.trace_window``) and
the stall check / shutdown times (from ``timeout_s``) so a stuck peer ends in an error, not a hang.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

from lmsdp.runtime.chrome_trace import now_us
from lmsdp.runtime.network import InterfaceError, use_local
from lmsdp.runtime.topology import Topology
from lmsdp.runtime.trace_schedule import TraceWindow

from .base import Backend, CommError, OptimizerProxy, cpu_state, unwrap_optimizer
from .peers import peer_error
from .timing import BackwardWatcher
from .config import CommConfig


def horovod_timeline_path(timeline: str) -> str:
    """Horovod's own timeline (written by rank 0) next to lmsdp's allreduce trace."""
    stem, ext = os.path.splitext(timeline.replace("{rank}", "0"))
    return f"{stem}.horovod{ext or '.json'}"


def horovod_env(config: CommConfig) -> Dict[str, str]:
    """Environment Horovod must see before ``hvd.init()`` for this config."""
    env = {
        "HOROVOD_FUSION_THRESHOLD": str(int(config.fusion_threshold)),
        "HOROVOD_CYCLE_TIME": repr(float(config.cycle_time_ms)),
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, int(config.timeout_s // 2))),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(max(2, int(round(config.timeout_s)))),
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(max(30, int(round(config.timeout_s)))),
    }
    if config.timeline:  # started and stopped by HorovodBackend with the trace window
        env["HOROVOD_TIMELINE"] = "DYNAMIC"
    return env


class HorovodBackend(Backend):
    """Horovod data parallelism; see the module docstring."""

    name = "horovod"

    def __init__(self, config: CommConfig, device: Optional[torch.device] = None,
                 topology: Optional[Topology] = None) -> None:
        """``topology`` is accepted for the common backend signature; Horovod finds its peers itself."""
        super().__init__(config)
        if config.gradient_predivide_factor != 1.0 and config.op != "average":
            raise ValueError("gradient_predivide_factor needs op=average (Horovod's rule)")
        env = horovod_env(config)
        self.timeline_path = horovod_timeline_path(config.timeline) if config.timeline else None
        if self.timeline_path:  # Horovod does not create the folder
            os.makedirs(os.path.dirname(os.path.abspath(self.timeline_path)), exist_ok=True)
        os.environ.update(env)
        try:
            use_local(config.interface, socket.gethostname())  # Horovod's gloo; MPI's is on mpirun's line
        except InterfaceError as exc:
            raise CommError(str(exc), backend="horovod") from None
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo"
        self.description = f"horovod ({self.controller} controller)"
        if device is None:
            device = (torch.device("cuda", self.local_rank % torch.cuda.device_count())
                      if torch.cuda.is_available() else torch.device("cpu"))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._failed: Optional[CommError] = None
        self._down = False
        self.peers: List[Tuple[str, int]] = self._call("allgather", hvd.allgather_object,
                                                       (socket.gethostname(), os.getpid()))
        self._open_trace()
        self._window: Optional[TraceWindow] = None
        self._timeline_on = False
        self._set_timeline(True)  # every step until a trace window says otherwise

    # --- Horovod's own timeline: recorded in the trace window's steps (a restart rewrites the file)
    def trace_window(self, window: TraceWindow) -> None:
        super().trace_window(window)
        self._window = window
        self._set_timeline(window.active)

    def step_begins(self) -> None:
        if self._window is not None:
            self._set_timeline(self._window.active)

    def _set_timeline(self, on: bool) -> None:
        if self.timeline_path is None or on == self._timeline_on:
            return
        if on:
            self._call("timeline", self.hvd.start_timeline, self.timeline_path)
        else:
            self._call("timeline", self.hvd.stop_timeline)
        self._timeline_on = on

    # --- errors ----------------------------------------------------------------------------------
    def comm_error(self, what: str, exc: BaseException) -> CommError:
        err = peer_error("horovod", what, exc, self.rank, self.size, getattr(self, "peers", []),
                         self.config.timeout_s)
        self._failed = err
        return err

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._failed is not None:
            raise CommError(f"horovod backend: unusable after an earlier failure: {self._failed}",
                            backend="horovod", peer=self._failed.peer)
        try:
            return fn(*args, **kwargs)
        except CommError:
            raise
        except Exception as exc:  # HorovodInternalError / RuntimeError / ValueError from a dead peer
            raise self.comm_error(what, exc) from exc

    def op(self, name: str) -> Any:
        return {"average": self.hvd.Average, "sum": self.hvd.Sum, "adasum": self.hvd.Adasum}[name]

    # --- API -------------------------------------------------------------------------------------
    def broadcast_state(self, model: torch.nn.Module, optimizer: Optional[Any] = None) -> None:
        hvd = self.hvd
        self._call("broadcast", hvd.broadcast_parameters, model.state_dict(), root_rank=0)
        if optimizer is not None:
            # rank 0's whole state as one object rather than hvd.broadcast_optimizer_state: that one
            # needs the same state keys on every rank and steps an empty optimizer with zero
            # gradients (which moves parameters under weight decay) -- wrong for resume-on-rank-0.
            inner = unwrap_optimizer(optimizer)
            state = cpu_state(inner.state_dict()) if self.rank == 0 else None
            state = self._call("broadcast", hvd.broadcast_object, state, root_rank=0,
                               name="lmsdp.optimizer_state")
            if self.rank != 0:
                inner.load_state_dict(state)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> "HorovodOptimizer":
        return HorovodOptimizer(self, optimizer, model)

    def allreduce(self, tensor: torch.Tensor, op: str = "average") -> torch.Tensor:
        if op not in ("average", "sum"):
            raise ValueError(f"horovod backend: allreduce op {op!r} (use average or sum)")
        return self._call("allreduce", self.hvd.allreduce, tensor.detach(), op=self.op(op))

    def allgather_object(self, obj: Any) -> List[Any]:
        # Horovod names the collective after type(obj) unless told: ranks passing different types (a
        # list on rank 0, None elsewhere) then submit differently named ops and wait for each other forever
        return list(self._call("allgather", self.hvd.allgather_object, obj, name="lmsdp.allgather_object"))

    def barrier(self) -> None:
        self._call("barrier", self.hvd.barrier)

    def shutdown(self) -> None:
        if self.timer.trace is not None:
            self.timer.trace.close()
        if not self._down:
            self._down = True
            try:
                self.hvd.shutdown()
            except Exception:  # already shut down by a failure
                pass


class HorovodOptimizer(OptimizerProxy):
    """``hvd.DistributedOptimizer`` plus timing: launches are stamped in Horovod's own
    ``_allreduce_grad_async`` (wrapped on the instance), completions are observed with ``hvd.poll`` at
    every gradient hook, at the end of backward, and in ``step()`` (so an end time is accurate to the
    gap between hooks)."""

    def __init__(self, backend: HorovodBackend, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        hvd = backend.hvd
        cfg = backend.config
        self.backend = backend
        compression = hvd.Compression.fp16 if cfg.compression == "fp16" else hvd.Compression.none
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in opt_ids]
        self.optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=named, compression=compression,
            backward_passes_per_step=cfg.backward_passes_per_step, op=backend.op(cfg.op),
            gradient_predivide_factor=cfg.gradient_predivide_factor)
        self.adasum = cfg.op == "adasum"
        self._pending: List[Tuple[Hashable, Any]] = []
        self._seq = 0
        self._synchronized = False
        orig = self.optimizer._allreduce_grad_async
        timer = backend.timer
        fp16 = cfg.compression == "fp16"

        def timed(p: torch.nn.Parameter) -> Tuple[Any, Any]:
            t = now_us()
            handle, ctx = orig(p)
            key = ("hvd", self._seq)
            self._seq += 1
            wire = 2 if (fp16 and p.is_floating_point()) else p.element_size()
            timer.started(key, p.numel() * wire, "allreduce " + str(
                self.optimizer._parameter_names.get(p, "?")), t)
            self._pending.append((key, handle))
            return handle, ctx

        self.optimizer._allreduce_grad_async = timed
        params = [p for _, p in named if p.requires_grad]
        self.watcher = BackwardWatcher(params, self._backward_end, lambda _p: self._poll())

    def _poll(self) -> None:
        """Stamp the completions that have happened, oldest first (Horovod completes roughly in
        launch order; stopping at the first unfinished one keeps this O(1) per hook)."""
        poll = self.backend.hvd.poll
        while self._pending:
            key, handle = self._pending[0]
            try:
                done = callable(handle) or poll(handle)
            except Exception:
                done = True  # the error surfaces in synchronize()
            if not done:
                return
            self.backend.timer.finished(key)
            self._pending.pop(0)

    def _backward_end(self) -> None:
        self._poll()
        self.backend.timer.backward_ended()

    def synchronize(self) -> None:
        """Wait for every gradient reduction (launching the ones backward did not) and write the
        results into ``p.grad``; counted as comm_wait_ms."""
        if self._synchronized or self.adasum:
            return
        backend = self.backend
        t0 = now_us()
        deadline = time.monotonic() + backend.config.timeout_s
        while self._pending:
            self._poll()
            if self._pending:
                if time.monotonic() > deadline:
                    raise backend.comm_error("allreduce", TimeoutError(
                        f"no completion within {backend.config.timeout_s:g} s"))
                time.sleep(50e-6)
        backend._call("allreduce", self.optimizer.synchronize)
        t1 = now_us()
        for key, _ in self._pending:  # launched inside synchronize (unused params, early step())
            backend.timer.finished(key, t1)
        self._pending.clear()
        backend.timer.waited(t0, t1)
        self._synchronized = True

    def step(self, closure: Any = None) -> Any:
        if self.adasum:  # Adasum's optimizer steps per parameter in its hooks, waits in step()
            t0 = now_us()
            out = self.backend._call("allreduce", self.optimizer.step, closure)
            t1 = now_us()
            for key, _ in self._pending:
                self.backend.timer.finished(key, t1)
            self._pending.clear()
            self.backend.timer.waited(t0, t1)
            return out
        self.synchronize()
        self._synchronized = False
        with self.optimizer.skip_synchronize():
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad()  # Horovod's checks for reductions in flight; sets grads to None
        if not set_to_none:
            for g in self.optimizer.param_groups:
                for p in g["params"]:
                    if p.grad is None and p.requires_grad:
                        p.grad = torch.zeros_like(p)

    def __repr__(self) -> str:
        return f"HorovodOptimizer({self.optimizer!r})"

