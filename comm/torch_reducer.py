"""The torch backend's gradient reducer: bucketed async all_reduce started as each bucket's last
gradient is accumulated in backward (the DDP idea), waited for in ``step()``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

from lmsdp.runtime.chrome_trace import now_us

from .base import CommError, OptimizerProxy
from .config import CommConfig
from .timing import BackwardWatcher, StepTimer


class ReducingBackend(Protocol):
    """What the reducer needs of the torch backend (a protocol, so neither module imports the other)."""

    config: CommConfig
    timer: StepTimer
    size: int
    pg_backend: str

    def _check(self) -> None: ...

    def comm_error(self, what: str, exc: BaseException) -> CommError: ...

    def wait_work(self, work: Any, what: str) -> None: ...


@dataclass
class _Bucket:
    """Gradients reduced as one flat tensor; launched when the last of them is ready."""

    index: int
    params: List[torch.nn.Parameter]
    ready: int = 0
    work: Any = None
    done: Any = None  # future whose callback stamps the end time (gloo)
    flat: Optional[torch.Tensor] = None
    key: Tuple[int, int] = (0, 0)


class TorchDistributedOptimizer(OptimizerProxy):
    """Optimizer wrapper: bucketed async all_reduce of gradients during backward, waited in step().

    Buckets hold parameters in reverse registration order (the order backward produces gradients),
    up to ``fusion_threshold`` bytes, one dtype/device each. Buckets are launched strictly in index
    order so every rank issues the same collectives in the same order, whatever order its gradients
    arrive in. With ``backward_passes_per_step = k`` gradients accumulate locally and are reduced
    during the k-th backward only. Parameters that received no gradient are reduced as zeros in
    ``step()``/``synchronize()`` (like Horovod), so ranks never diverge in what they send."""

    def __init__(self, backend: ReducingBackend, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 group: Any = None, group_size: Optional[int] = None) -> None:
        """``group``/``group_size``: reduce over this process group only (the dp ranks of a mesh;
        default every rank). DTensor parameters (tensor parallelism) are reduced by their local shards."""
        cfg = backend.config
        if cfg.backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        if cfg.gradient_predivide_factor != 1.0 and cfg.op != "average":
            raise ValueError("gradient_predivide_factor needs op=average")
        self.backend = backend
        self.optimizer = optimizer
        self.bpps = cfg.backward_passes_per_step
        self.compress = cfg.compression == "fp16"
        self.average = cfg.op == "average"
        self.predivide = float(cfg.gradient_predivide_factor)
        self.group = group
        self.group_size = group_size if group_size is not None else backend.size
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in model.parameters() if p.requires_grad and id(p) in opt_params]
        # parameters the optimizer holds that are not in the model still get reduced
        model_ids = {id(p) for p in params}
        params += [p for g in optimizer.param_groups for p in g["params"]
                   if p.requires_grad and id(p) not in model_ids]
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, _Bucket] = {}
        cap = max(1, int(cfg.fusion_threshold))
        cur: List[torch.nn.Parameter] = []
        cur_bytes = 0
        for p in reversed(params):
            nbytes = _local(p).numel() * p.element_size()
            if cur and (cur_bytes + nbytes > cap or cur[0].dtype != p.dtype or cur[0].device != p.device):
                self._add_bucket(cur)
                cur, cur_bytes = [], 0
            cur.append(p)
            cur_bytes += nbytes
        if cur:
            self._add_bucket(cur)
        self._counts: Dict[int, int] = {id(p): 0 for p in params}
        self._next = 0
        self._step_no = 0
        self._synchronized = False
        self._exact_end = backend.pg_backend == "gloo"
        self.watcher = BackwardWatcher(params, self._backward_end, self._grad_ready)

    def _add_bucket(self, params: List[torch.nn.Parameter]) -> None:
        b = _Bucket(len(self.buckets), list(params))
        self.buckets.append(b)
        for p in params:
            self._bucket_of[id(p)] = b

    # --- hooks -----------------------------------------------------------------------------------
    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        n = self._counts[id(p)] + 1
        if n > self.bpps:
            raise RuntimeError(f"gradients computed {n} times before step(); backward_passes_per_step "
                               f"is {self.bpps} (raise it to accumulate locally)")
        self._counts[id(p)] = n
        if n == self.bpps:
            b = self._bucket_of[id(p)]
            b.ready += 1
            if b.ready == len(b.params):
                self._launch_in_order(force=False)
        self._poll()

    def _backward_end(self) -> None:
        self._poll()
        self.backend.timer.backward_ended()

    def _poll(self) -> None:
        if self._exact_end:
            return  # gloo futures stamp the end themselves
        for b in self.buckets[:self._next]:
            if b.work is not None and b.work.is_completed():
                self.backend.timer.finished(b.key)

    # --- reduction -------------------------------------------------------------------------------
    def _launch_in_order(self, force: bool) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if not force and b.ready < len(b.params):
                return
            self._launch(b)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        backend = self.backend
        backend._check()
        grads = []
        for p in b.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(_local(p.grad).detach().reshape(-1))
        flat = torch.cat(grads)
        if self.compress and flat.is_floating_point():
            flat = flat.to(torch.float16)
        if self.average and self.predivide != 1.0:
            flat.div_(self.predivide)
        b.key = (self._step_no, b.index)
        b.flat = flat
        backend.timer.started(b.key, flat.numel() * flat.element_size(), f"allreduce bucket {b.index}")
        try:
            b.work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        except Exception as exc:
            raise backend.comm_error("allreduce", exc) from exc
        if self._exact_end:
            key, timer = b.key, backend.timer
            b.done = b.work.get_future().then(lambda _f: timer.finished(key))

    def synchronize(self) -> None:
        """Launch what backward did not (unused parameters, early step()), wait for every bucket and
        write the reduced gradients back into ``p.grad``."""
        if self._synchronized:
            return
        t0 = now_us()
        self._launch_in_order(force=True)
        deadline = time.monotonic() + self.backend.config.timeout_s
        for b in self.buckets:
            if not self._exact_end:
                # NCCL: wait() only orders streams; poll until the collective really finished so the
                # end time and comm_wait_ms mean the same as for gloo and Horovod
                while not b.work.is_completed() and time.monotonic() < deadline:
                    time.sleep(50e-6)
            self.backend.wait_work(b.work, "allreduce")
            if b.done is not None:
                b.done.wait()
            self.backend.timer.finished(b.key)
        t1 = now_us()
        self.backend.timer.waited(t0, t1)
        for b in self.buckets:
            flat = b.flat
            if flat.dtype != b.params[0].dtype:  # fp16 on the wire -> back to the gradient dtype
                flat = flat.to(b.params[0].dtype)
            if self.average:
                flat = flat.div_(self.group_size / self.predivide)
            offset = 0
            for p in b.params:
                grad = _local(p.grad)
                n = grad.numel()
                grad.copy_(flat[offset:offset + n].view_as(grad))
                offset += n
            b.work = b.done = b.flat = None
            b.ready = 0
        for k in self._counts:
            self._counts[k] = 0
        self._next = 0
        self._step_no += 1
        self._synchronized = True

    def step(self, closure: Any = None) -> Any:
        """Wait for the reductions (time counted as comm_wait_ms), then the wrapped step."""
        self.synchronize()
        self._synchronized = False
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._next > 0:
            raise RuntimeError("zero_grad() after backward but before step()/synchronize(): the "
                               "reductions in flight would be lost")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"TorchDistributedOptimizer({self.optimizer!r}, buckets={len(self.buckets)})"

    def bucket_sizes(self) -> Iterator[int]:
        """Bytes per bucket (for logs and tests)."""
        for b in self.buckets:
            yield sum(_local(p).numel() * p.element_size() for p in b.params)


def _local(t: Any) -> torch.Tensor:
    """A DTensor's local shard (the same storage), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
