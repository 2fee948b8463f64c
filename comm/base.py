"""The comm backend interface and what every backend shares: the error type, the optimizer proxy
and CPU copies of state for broadcasting. Timing is in ``comm/timing.py``, dead-peer checks in
``comm/peers.py``, trace files in ``lmsdp.runtime.chrome_trace``."""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional

import torch

from lmsdp.runtime.chrome_trace import ChromeTrace, rank_path
from lmsdp.runtime.trace_schedule import TraceWindow

from .config import CommConfig
from .timing import ALLREDUCE_LANE, WAIT_LANE, StepTimer


class CommError(RuntimeError):
    """A collective failed or timed out (typically a dead or stuck peer). The message names the
    backend and, where it can be found out, the peer rank."""

    def __init__(self, message: str, backend: str = "", peer: Optional[int] = None) -> None:
        super().__init__(message)
        self.backend = backend
        self.peer = peer


class OptimizerProxy:
    """Looks like the wrapped ``self.optimizer`` (param_groups, state, state dicts, any other attribute)
    so schedulers, GradScaler and checkpoint code treat a backend's optimizer as the torch one."""

    optimizer: Any

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["optimizer"], name)


class Backend(ABC):
    """What the worker uses to keep data-parallel ranks in step. See ``lmsdp.comm`` for the API."""

    name: str = "?"

    def __init__(self, config: CommConfig) -> None:
        self.config = config
        self.rank = 0
        self.size = 1
        self.local_rank = 0
        self.local_size = 1
        self.timer = StepTimer()

    def _open_trace(self) -> None:
        if self.config.timeline:
            path = rank_path(self.config.timeline, self.rank, self.size)
            self.timer.trace = ChromeTrace(path, self.rank, {ALLREDUCE_LANE: f"allreduce ({self.name})",
                                                               WAIT_LANE: "comm wait in step()"})

    def trace_window(self, window: TraceWindow) -> None:
        """Record the comm timeline only in ``window``'s traced steps (the training loop moves it)."""
        if self.timer.trace is not None:
            self.timer.trace.window = window

    def step_begins(self) -> None:
        """A training step starts (the training loop calls this after moving the trace window);
        backends with a trace of their own (Horovod's timeline) follow the window here."""

    @property
    def trace_path(self) -> Optional[str]:
        """Where this rank's allreduce chrome trace goes (None without ``timeline``)."""
        return self.timer.trace.path if self.timer.trace is not None else None

    @abstractmethod
    def broadcast_state(self, model: torch.nn.Module, optimizer: Optional[Any] = None) -> None:
        """Rank 0's parameters/buffers and optimizer state to every rank (start and after resume)."""

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
        """An optimizer whose gradients are reduced across ranks as they become ready in backward."""

    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str = "average") -> torch.Tensor:
        """Reduced copy of ``tensor`` (for metrics such as the loss)."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (small picklable objects: checksums, flags), in rank order."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every rank got here."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the backend; safe to call twice and after a failure."""

    def step_stats(self) -> Dict[str, float]:
        """allreduce_ms, allreduce_hidden_frac, comm_wait_ms, allreduce_count, allreduce_bytes,
        backward_passes since the previous call (call once per optimizer step); JSON-able."""
        return self.timer.collect()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def cpu_state(obj: Any) -> Any:
    """Copy of a (nested) state dict with every tensor on the CPU: what is broadcast as a Python
    object, so unpickling never allocates on another rank's GPU; ``load_state_dict`` moves tensors
    back to each parameter's device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_state(v) for v in obj)
    return obj


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper returned by ``wrap_optimizer`` (or the argument)."""
    return getattr(optimizer, "optimizer", optimizer)


def info(message: str) -> None:
    """One line to stderr with the project's prefix."""
    print(f"[lmsdp] {message}", file=sys.stderr, flush=True)
