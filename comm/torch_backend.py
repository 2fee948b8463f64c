"""torch.distributed backend: gloo on CPU, NCCL on GPU, with a bucketed gradient reducer that
starts each bucket's async all_reduce as soon as its last gradient is accumulated in backward
(the DDP idea) and waits for all of them in ``step()``.

A process group that is already initialized is reused (and not destroyed at shutdown); otherwise
the ranks meet as ``comm/rendezvous.py`` says. The gradient reducer is ``comm/torch_reducer.py``.
"""
from __future__ import annotations

import gc
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from lmsdp.runtime.topology import Topology, detect_topology

from .base import Backend, CommError, cpu_state, unwrap_optimizer
from .config import CommConfig
from .peers import peer_error
from .rendezvous import rendezvous
from .torch_reducer import TorchDistributedOptimizer

_OPS = {"average": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM}


class TorchBackend(Backend):
    """torch.distributed (gloo/NCCL) data parallelism; see the module docstring."""

    name = "torch"

    def __init__(self, config: CommConfig, device: Optional[torch.device] = None,
                 topology: Optional[Topology] = None) -> None:
        super().__init__(config)
        topology = topology or detect_topology()
        if config.op not in _OPS:
            raise ValueError(f"torch backend: op {config.op!r} is not supported (use average or sum; "
                             "adasum needs the horovod backend)")
        self._own_group = not dist.is_initialized()
        self._failed: Optional[CommError] = None
        if self._own_group:
            rv = rendezvous(topology, config)
            self.rank, self.size = rv.rank, rv.size
            self.local_rank, self.local_size = rv.local_rank, rv.local_size
            self.peers, self.via = rv.peers, rv.via
        else:
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self.local_rank, self.local_size = topology.local_rank, topology.local_size
            self.peers, self.via = [], "existing process group"
        if device is None:
            device = (torch.device("cuda", self.local_rank % torch.cuda.device_count())
                      if torch.cuda.is_available() else torch.device("cpu"))
        self.device = torch.device(device)
        self.pg_backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self._own_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.pg_backend, store=rv.store, rank=self.rank,
                                    world_size=self.size, timeout=timedelta(seconds=config.timeout_s))
        else:
            self.pg_backend = dist.get_backend()
        self.name = "torch"
        self.description = f"torch ({self.pg_backend}, rendezvous {self.via})"
        self._open_trace()

    # --- errors ----------------------------------------------------------------------------------
    def comm_error(self, what: str, exc: BaseException) -> CommError:
        """CommError naming the peer (see ``base.peer_error``); the backend is unusable afterwards."""
        err = peer_error("torch", what, exc, self.rank, self.size, self.peers, self.config.timeout_s)
        self._failed = err
        return err

    def _check(self) -> None:
        if self._failed is not None:
            raise CommError(f"torch backend: unusable after an earlier failure: {self._failed}",
                            backend="torch", peer=self._failed.peer)

    def wait_work(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:  # gloo raises RuntimeError/DistBackendError on a dead/stuck peer
            raise self.comm_error(what, exc) from exc

    # --- API -------------------------------------------------------------------------------------
    def broadcast_state(self, model: torch.nn.Module, optimizer: Optional[Any] = None) -> None:
        self._check()
        try:
            works = [dist.broadcast(t, src=0, async_op=True)
                     for _, t in sorted(model.state_dict(keep_vars=False).items())]
        except Exception as exc:
            raise self.comm_error("broadcast", exc) from exc
        for w in works:
            self.wait_work(w, "broadcast")
        if optimizer is not None:
            inner = unwrap_optimizer(optimizer)
            box = [cpu_state(inner.state_dict()) if self.rank == 0 else None]
            try:
                dist.broadcast_object_list(box, src=0, device=self._obj_device())
            except Exception as exc:
                raise self.comm_error("broadcast", exc) from exc
            if self.rank != 0:
                inner.load_state_dict(box[0])

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, group: Any = None,
                       group_size: Optional[int] = None) -> "TorchDistributedOptimizer":
        """``group``: reduce over these ranks only (a mesh's dp group), ``group_size`` of them."""
        return TorchDistributedOptimizer(self, optimizer, model, group=group, group_size=group_size)

    def allreduce(self, tensor: torch.Tensor, op: str = "average") -> torch.Tensor:
        self._check()
        if op not in _OPS:
            raise ValueError(f"torch backend: allreduce op {op!r} (use average or sum)")
        buf = tensor.detach().to(self.device, copy=True)
        try:
            work = dist.all_reduce(buf, op=_OPS[op], async_op=True)
        except Exception as exc:
            raise self.comm_error("allreduce", exc) from exc
        self.wait_work(work, "allreduce")
        if op == "average":
            buf = buf / self.size if not buf.is_floating_point() else buf.div_(self.size)
        return buf.to(tensor.device)

    def _obj_device(self) -> Optional[torch.device]:
        return self.device if self.pg_backend == "nccl" else None

    def allgather_object(self, obj: Any) -> List[Any]:
        self._check()
        out: List[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except Exception as exc:
            raise self.comm_error("allgather", exc) from exc
        return out

    def barrier(self) -> None:
        self._check()
        try:
            if self.pg_backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()
        except Exception as exc:
            raise self.comm_error("barrier", exc) from exc

    def shutdown(self) -> None:
        if self.timer.trace is not None:
            self.timer.trace.close()
        if self._own_group and dist.is_initialized():
            if self._failed is None:
                # Deterministic teardown before interpreter finalization (a gloo worker thread that
                # drops the last reference to a Python callback while the interpreter shuts down
                # aborts the process): every rank's collectives are done (barrier), the Work/Future
                # objects that hold Python callables are collected, and destroying the group joins
                # gloo's worker threads now rather than at exit.
                try:
                    self.barrier()
                except Exception:  # noqa: BLE001 - a peer is gone: leave the group alone, as after a failure
                    self._own_group = False
                    return
                gc.collect()
                dist.destroy_process_group()
                gc.collect()
            # after a failure the group is left alone: tearing it down can block on the dead peer
            self._own_group = False
