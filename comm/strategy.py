"""How data-parallel ranks hold the model: the interface every comm strategy implements (see
``comm/registry.py`` for the registered ones) and what they share.

```
strategy = get_strategy(config, backend)     # config.strategy: replicate | shard
model = strategy.prepare_model(model)        # before the optimizer is built
optimizer = strategy.wrap_optimizer(build_optimizer(model), model)
strategy.sync_state(model, optimizer)        # start, and after a (non-sharded) resume
norm = strategy.clip_grad_norm(model, optimizer, max_norm, scaler)
strategy.step_stats(model, optimizer)        # backend stats + this strategy's + bytes held
```
A strategy decides how gradients are reduced (the backend's allreduce-as-ready optimizer, or
FSDP2's reduce-scatter) so the two never both run."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from lmsdp.runtime.errors import UserError

from .base import Backend, info, unwrap_optimizer
from .config import CommConfig
from .mesh import MeshLayout, parse_mesh
from .registry import STRATEGIES


class Strategy(ABC):
    """One way of laying the model, its gradients and optimizer state out over the ranks."""

    name: str = "?"
    sharded: bool = False  # each rank holds only part of the state: checkpoints are written by all ranks

    def __init__(self, config: CommConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self._held = HeldBytes()
        # comm.mesh with tp > 1: a 2-D (dp, tp) DeviceMesh; this strategy then applies along dp only
        self.layout: Optional[MeshLayout] = None
        self.tp_plan: Any = None
        shape = parse_mesh(config.mesh, backend.size)
        if shape.tp > 1:
            if backend.name != "torch":
                raise UserError(f"comm.backend: {backend.name} has no tensor parallelism (comm.mesh: "
                                f"{shape.describe()}); use comm.backend: torch")
            self.layout = MeshLayout(shape, backend.rank, torch.device(backend.device).type)
            self.sharded = True  # each rank holds a part of the layers: every rank writes its shards

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel groups (what batches it reads)."""
        return self.layout.dp_rank if self.layout is not None else self.backend.rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp if self.layout is not None else self.backend.size

    def parallelize(self, model: nn.Module) -> nn.Module:
        """tp > 1: rank 0's weights to every rank, then the tensor-parallel plan applied over the tp
        sub-mesh (before the swap engine wraps the model: plan names are the model's own)."""
        if self.layout is None:
            return model
        from .tensor_parallel import plan_tensor_parallel
        from .tp_apply import apply_tensor_parallel

        plan = plan_tensor_parallel(model, self.config.tp_plan, self.config.sequence_parallel, self.layout.tp)
        self.backend.broadcast_state(model)
        apply_tensor_parallel(model, plan, self.layout.tp_mesh)
        self.tp_plan = plan
        if self.backend.rank == 0:
            info(f"comm mesh: {self.layout.shape.describe()} ({self.name} along dp); {plan.describe()}")
        return model

    @abstractmethod
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as this strategy trains it (same object, possibly converted in place)."""

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
        """An optimizer whose ``step()`` sees gradients reduced across ranks."""

    @abstractmethod
    def sync_state(self, model: nn.Module, optimizer: Any) -> None:
        """Make every rank's state consistent (rank 0's, for replicas) at start and after resume."""

    def grad_scaler(self, device: torch.device, enabled: bool) -> Any:
        """The float16 loss scaler: found-inf must be agreed on by every rank."""
        return torch.amp.GradScaler(device.type, enabled=enabled)

    def clip_grad_norm(self, model: nn.Module, optimizer: Any, max_norm: float, scaler: Any) -> float:
        """Unscale (float16 AMP) and clip the reduced gradients to ``max_norm``; returns the total norm
        before clipping, the same on every rank."""
        scaler.unscale_(optimizer)
        params = [p for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]]
        if self.layout is not None:
            from .mesh_grads import clip_mesh_grads

            return clip_mesh_grads(params, max_norm, self.layout)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # DTensor grads (shard) give a DTensor norm
        return float(full() if full is not None else norm)

    def step_stats(self, model: nn.Module, optimizer: Any) -> Dict[str, float]:
        """Once per step: the backend's reduction stats, and the bytes this rank holds."""
        return {**self.backend.step_stats(), **self._held.measure(model, optimizer)}

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the next backward reduces gradients (accumulation turns it off before the last
        micro-batch). replicate's optimizers count backward passes themselves (backward_passes_per_step)."""

    def close(self) -> None:
        """Release what the strategy opened (trace lanes, hooks)."""


def get_strategy(config: CommConfig, backend: Backend) -> Strategy:
    """The strategy ``config.strategy`` names, bound to ``backend``."""
    return STRATEGIES.get(config.strategy).load()(config, backend)


def _local(t: Any) -> torch.Tensor:
    """A DTensor's local shard (or the tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _nbytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = _local(t)
            total += local.numel() * local.element_size()
    return total


class HeldBytes:
    """``state_bytes`` once per change, not once per step: the sizes follow from the parameters, so
    they change only when the optimizer's state gains entries or a parameter gains or loses its
    gradient (walking every tensor each step cost 1.3 ms for ResNet-152's 467 parameters)."""

    def __init__(self) -> None:
        self._params: Optional[List[nn.Parameter]] = None
        self._key: Optional[Tuple[int, int]] = None
        self._value: Dict[str, int] = {}

    def measure(self, model: nn.Module, optimizer: Any) -> Dict[str, int]:
        if self._params is None:
            self._params = list(model.parameters())
        key = (len(unwrap_optimizer(optimizer).state), sum(p.grad is not None for p in self._params))
        if key != self._key:
            self._key, self._value = key, state_bytes(model, optimizer)
        return dict(self._value)


def state_bytes(model: nn.Module, optimizer: Any) -> Dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds, measured from the tensors
    (a DTensor counts its local shard). Tied parameters count once."""
    params = list(model.parameters())
    state = unwrap_optimizer(optimizer).state
    return {
        "param_bytes": _nbytes(params),
        "grad_bytes": _nbytes(p.grad for p in params),
        "optim_bytes": _nbytes(v for s in state.values() for v in s.values()),
    }
