"""``strategy: shard``: parameters, gradients and optimizer state sharded across the data-parallel
ranks with torch's FSDP2 (``fully_shard``), not an engine of our own.

- Each *block* (detected, or the classes named in ``comm.shard_modules``) gets its own
  ``fully_shard`` so only one block's parameters are gathered at a time; the root gets one for
  what is left (embeddings, heads, stems). Blocks are found bottom-up: the children of a container
  (``nn.Sequential``/``nn.ModuleList``) holding two or more modules of one class that own
  parameters, i.e. transformer blocks, ResNet blocks, U-Net levels and most user models.
- The mesh is a DeviceMesh over the torch backend's world process group (its rendezvous: mpirun
  needs no MASTER_ADDR).
- FSDP2 reduce-scatters gradients itself, so the optimizer is *not* wrapped by the backend.
- All-gather and reduce-scatter are timed through FSDP2's custom-collective hooks (the default
  collectives, with a clock around them): ``allgather_ms``/``reduce_scatter_ms`` next to the swap
  figures, and spans on their own lanes of the comm timeline.
- The swap engine never swaps FSDP's unsharded parameters: they are leaf ``nn.Parameter`` objects
  (and weight views have them as ``_base``), which the engine's pack hook leaves alone; FSDP frees
  them itself after forward (``reshard_after_forward``) and after backward.
"""
from __future__ import annotations

import difflib
import threading
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from lmsdp.runtime.chrome_trace import now_us
from lmsdp.runtime.errors import UserError

from .base import Backend, info
from .config import CommConfig
from .registry import SHARDING_BACKENDS
from .strategy import Strategy
from .timing import _union_ms

ALLGATHER_LANE, REDUCE_SCATTER_LANE = 102, 103
SHARD_STAT_KEYS = ("allgather_ms", "allgather_count", "allgather_bytes",
                   "reduce_scatter_ms", "reduce_scatter_count", "reduce_scatter_bytes")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_offload_noted = False


# ------------------------------------------------------------------------------------- blocks
def detect_blocks(model: nn.Module) -> List[nn.Module]:
    """Repeated blocks, innermost containers last-resort: the children of the first containers (in
    module order) whose two or more children share one class and all own parameters."""
    found: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        children = list(module.children())
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(children) >= 2:
            kinds = {type(c) for c in children}
            if len(kinds) == 1 and all(any(True for _ in c.parameters()) for c in children):
                found.extend(children)
                return
        for child in children:
            visit(child)

    visit(model)
    return found


def named_blocks(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """Modules whose class name is in ``names`` (outermost only: a match inside a match is part of
    it); a name that matches nothing is a UserError with a did-you-mean."""
    present = sorted({type(m).__name__ for m in model.modules()})
    for name in names:
        if name not in present:
            close = difflib.get_close_matches(name, present, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"comm.shard_modules: no module of class '{name}' in the model{guess}; "
                            f"classes in it: {', '.join(present)}")
    wanted = set(names)
    found: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in wanted:
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def shard_units(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """What gets its own ``fully_shard`` (the root comes on top): named classes, else detected."""
    return named_blocks(model, names) if names else detect_blocks(model)


# ------------------------------------------------------------------------------- collectives
class CollectiveClock:
    """Spans of FSDP's all-gathers and reduce-scatters in one step (thread-safe: gloo futures
    complete on the process group's threads)."""

    def __init__(self, trace: Any = None) -> None:
        self.trace = trace
        self._spans: Dict[str, List[Tuple[float, float, int]]] = {"allgather": [], "reduce_scatter": []}
        self._lock = threading.Lock()

    def record(self, kind: str, start: float, end: float, nbytes: int) -> None:
        with self._lock:
            self._spans[kind].append((start, end, nbytes))
        if self.trace is not None:
            lane = ALLGATHER_LANE if kind == "allgather" else REDUCE_SCATTER_LANE
            self.trace.span(kind.replace("_", "-"), lane, start, end, bytes=nbytes)

    def timed(self, kind: str, work: Any, start: float, nbytes: int) -> Any:
        """Record now (synchronous call) or when ``work`` completes."""
        if work is None:
            self.record(kind, start, now_us(), nbytes)
        else:
            work.get_future().then(lambda _f: self.record(kind, start, now_us(), nbytes))
        return work

    def collect(self) -> Dict[str, float]:
        with self._lock:
            spans, self._spans = self._spans, {"allgather": [], "reduce_scatter": []}
        out: Dict[str, float] = {}
        for kind, items in spans.items():
            out[f"{kind}_ms"] = round(_union_ms([(s, e) for s, e, _ in items]), 4)
            out[f"{kind}_count"] = len(items)
            out[f"{kind}_bytes"] = sum(n for _, _, n in items)
        return out


def _timed_collectives(clock: CollectiveClock) -> Tuple[Any, Any]:
    """FSDP2's default all-gather / reduce-scatter with a clock around them (None, None when this
    torch has no custom-collective hooks: then no figures, training unchanged)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError:
        return None, None

    class TimedAllGather(DefaultAllGather):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                     async_op: bool = False) -> Any:
            start = now_us()
            work = super().__call__(output_tensor, input_tensor, group, async_op)
            return clock.timed("allgather", work, start, output_tensor.numel() * output_tensor.element_size())

    class TimedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> Any:
            start = now_us()
            work = super().__call__(output_tensor, input_tensor, group, op, async_op)
            return clock.timed("reduce_scatter", work, start, input_tensor.numel() * input_tensor.element_size())

    return TimedAllGather(), TimedReduceScatter()


# ----------------------------------------------------------------------------- loss scaling
def shard_grad_scaler(device_type: str) -> Any:
    """float16 loss scaling for FSDP2: torch's ShardedGradScaler (each rank checks its own gradient
    shards for inf/NaN, then found-inf is all-reduced so every rank skips the same steps), fed the
    DTensor gradients' local shards. Given the DTensors themselves, the unscale kernel wraps its
    per-rank found-inf tensor as a *replicated* DTensor (torch warns "implicitly creating a
    replicated DTensor"), which it is not until the all-reduce."""
    from collections import defaultdict

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler, _GeneralMultiDeviceReplicator
    from torch.distributed.tensor import DTensor

    class LocalShardGradScaler(ShardedGradScaler):
        def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor,
                            found_inf: torch.Tensor, allow_fp16: bool = True) -> Dict[torch.device, torch.Tensor]:
            inv_scales, found_infs = _GeneralMultiDeviceReplicator(inv_scale), _GeneralMultiDeviceReplicator(found_inf)
            shards: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = defaultdict(list)
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        grad = param.grad
                        if grad is None:
                            continue
                        local = grad.to_local() if isinstance(grad, DTensor) else grad  # the same storage
                        if not allow_fp16 and local.dtype == torch.float16:
                            raise ValueError("Attempting to unscale FP16 gradients.")
                        shards[(local.device, local.dtype)].append(local)
                for (device, _), tensors in shards.items():
                    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_infs.get(device),
                                                                     inv_scales.get(device))
            if not found_infs._per_device_tensors:  # a rank without gradient shards still votes
                found_infs.get(self._scale.device)
            return found_infs._per_device_tensors

    return LocalShardGradScaler(device_type, enabled=True)


# ---------------------------------------------------------------------------------- strategy
class ShardStrategy(Strategy):
    """FSDP2 over every rank; see the module docstring."""

    name = "shard"
    sharded = True

    def __init__(self, config: CommConfig, backend: Backend) -> None:
        super().__init__(config, backend)
        if backend.name not in SHARDING_BACKENDS:
            raise UserError(f"comm.backend: {backend.name} has no sharding (comm.strategy is 'shard'); "
                            f"use comm.backend: {' or '.join(SHARDING_BACKENDS)} (auto picks it for shard)")
        self.device = torch.device(backend.device)
        self.offload = config.offload == "optimizer_and_params" and self.device.type == "cuda"
        if self.dp_size < 2 and not self.offload:
            raise UserError(f"comm.strategy: shard needs 2 or more data-parallel ranks (this job has "
                            f"{self.dp_size}: nothing to shard across); use replicate, or add comm.offload: "
                            "optimizer_and_params on a GPU")
        self.units: List[nn.Module] = []
        trace = backend.timer.trace
        if trace is not None:
            for lane, label in ((ALLGATHER_LANE, "all-gather (fsdp)"), (REDUCE_SCATTER_LANE, "reduce-scatter (fsdp)")):
                trace.emit({"name": "thread_name", "ph": "M", "pid": backend.rank, "tid": lane,
                            "args": {"name": label}})
        self.clock = CollectiveClock(trace)

    def _fsdp_kwargs(self) -> Dict[str, Any]:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        global _offload_noted
        mp = self.config.mixed_precision
        policy = MixedPrecisionPolicy(param_dtype=_DTYPES.get(mp.param_dtype or ""),
                                      reduce_dtype=_DTYPES.get(mp.reduce_dtype or ""))
        offload: Any = OffloadPolicy()
        if self.offload:
            offload = CPUOffloadPolicy(pin_memory=True)
        elif self.config.offload != "none" and not _offload_noted and self.backend.rank == 0:
            _offload_noted = True
            info("comm.offload: optimizer_and_params is a no-op on CPU (parameters and optimizer state "
                 "are in host memory already)")
        # tp > 1: the dp sub-mesh of the 2-D mesh (FSDP2 + TP as torchtitan: fully_shard after parallelize)
        mesh = self.layout.dp_mesh if self.layout is not None else DeviceMesh.from_group(dist.group.WORLD,
                                                                                          self.device.type)
        return {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Rank 0's weights to every rank (before sharding: each shard is cut from the same tensor),
        then ``fully_shard`` per unit, bottom-up, and on the root; collectives timed."""
        from torch.distributed.fsdp import fully_shard

        units = shard_units(model, self.config.shard_modules)
        kinds = sorted({type(u).__name__ for u in units})  # before fully_shard renames them FSDP<class>
        if self.layout is None:  # under tp the weights were broadcast before the split (parallelize)
            self.backend.broadcast_state(model)
        kwargs = self._fsdp_kwargs()
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.config.reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)
        self.units = units
        gather, scatter = _timed_collectives(self.clock)
        if gather is not None:
            for module in [*units, model]:
                module.set_custom_all_gather(gather)
                module.set_custom_reduce_scatter(scatter)
        if self.backend.rank == 0:
            info(f"comm strategy: shard over {self.dp_size} ranks, {len(units)} units "
                 f"({', '.join(kinds) or 'root only'}) + root"
                 + (", parameters and optimizer offloaded to host" if self.offload else ""))
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """FSDP2 reduce-scatters in every backward unless told not to (accumulation's early micro-batches)."""
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
        return optimizer  # FSDP2 reduce-scatters gradients in backward; nothing to add

    def sync_state(self, model: nn.Module, optimizer: Any) -> None:
        pass  # broadcast before sharding; after a resume every rank loaded its own shard

    def grad_scaler(self, device: torch.device, enabled: bool) -> Any:
        if not enabled:
            return torch.amp.GradScaler(device.type, enabled=False)
        return shard_grad_scaler(device.type)

    def step_stats(self, model: nn.Module, optimizer: Any) -> Dict[str, float]:
        return {**super().step_stats(model, optimizer), **self.clock.collect()}
