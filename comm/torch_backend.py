"""torch.distributed backend: gloo on CPU, NCCL on GPU, with a bucketed gradient reducer that
starts each bucket's async all_reduce as soon as its last gradient is accumulated in backward
(the DDP idea) and waits for all of them in ``step()``.

Rendezvous, in this order:
1. a process group that is already initialized is reused (and not destroyed at shutdown);
2. the topology (``lmsdp.runtime.topology``) says an MPI world exists (mpirun, srun --mpi=pmix):
   mpi4py gives rank/size/local rank; rank 0 opens a TCPStore on a free port (port 0, so no race)
   and broadcasts address:port;
3. the topology has a store address from the launcher (torchrun's MASTER_ADDR/MASTER_PORT);
4. otherwise a single process on a local free port.
"""
from __future__ import annotations

import gc
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from lmsdp.runtime.chrome_trace import now_us
from lmsdp.runtime.topology import Topology, advertised_address, detect_topology, unreachable_world

from .base import Backend, CommError, OptimizerProxy, cpu_state, unwrap_optimizer
from .peers import peer_error
from .timing import BackwardWatcher
from .config import CommConfig

_OPS = {"average": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM}
@dataclass
class Rendezvous:
    """Where this rank sits and how the process group is reached."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    store: Optional[dist.Store]
    via: str
    peers: List[Tuple[str, int]] = field(default_factory=list)  # (hostname, pid) per rank, if known


def _rendezvous(topology: Topology, timeout_s: float) -> Rendezvous:
    """Meet the other ranks: through the MPI world when there is one (rank 0 opens a TCPStore on a
    free port and broadcasts address:port, so no MASTER_ADDR is needed), else through the store
    address the launcher gave (torchrun), else alone."""
    store_timeout = timedelta(seconds=max(60.0, timeout_s))
    host = socket.gethostname()
    if topology.mpi_world:
        from mpi4py import MPI  # initializes MPI; only imported when launched by MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        peers = comm.allgather((host, os.getpid()))
        store = None
        if rank == 0:
            addr = "127.0.0.1" if all(h == host for h, _ in peers) else advertised_address()
            store = dist.TCPStore(addr, 0, size, True, timeout=store_timeout, wait_for_workers=False)
            endpoint = (addr, int(store.port))
        else:
            endpoint = None
        addr, port = comm.bcast(endpoint, root=0)
        if rank != 0:
            store = dist.TCPStore(addr, port, size, False, timeout=store_timeout)
        return Rendezvous(rank, size, local_rank, local_size, store, f"mpi4py ({addr}:{port})", peers)
    if topology.main_port is not None:
        rank, size = topology.rank, topology.size
        addr, port = topology.main_address or "127.0.0.1", topology.main_port
        store = dist.TCPStore(addr, port, size, rank == 0, timeout=store_timeout)
        # share (host, pid) through the store so a dead local peer can be named later
        store.set(f"lmsdp/peer/{rank}", f"{host} {os.getpid()}")
        peers = []
        for r in range(size):
            h, pid = store.get(f"lmsdp/peer/{r}").decode().split()
            peers.append((h, int(pid)))
        return Rendezvous(rank, size, topology.local_rank, topology.local_size, store, f"env ({addr}:{port})", peers)
    problem = unreachable_world()
    if problem:
        raise CommError(f"torch backend: {problem} but no MPI or torchrun environment to rendezvous through; "
                        "launch with mpirun, srun --mpi=pmix or torchrun, or use the horovod backend",
                        backend="torch")
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=store_timeout, wait_for_workers=False)
    return Rendezvous(0, 1, 0, 1, store, f"single process (127.0.0.1:{store.port})",
                      [(host, os.getpid())])


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
            rv = _rendezvous(topology, config.timeout_s)
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

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> "TorchDistributedOptimizer":
        return TorchDistributedOptimizer(self, optimizer, model)

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

    def __init__(self, backend: TorchBackend, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
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
            nbytes = p.numel() * p.element_size()
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
            grads.append(p.grad.detach().reshape(-1))
        flat = torch.cat(grads)
        if self.compress and flat.is_floating_point():
            flat = flat.to(torch.float16)
        if self.average and self.predivide != 1.0:
            flat.div_(self.predivide)
        b.key = (self._step_no, b.index)
        b.flat = flat
        backend.timer.started(b.key, flat.numel() * flat.element_size(), f"allreduce bucket {b.index}")
        try:
            b.work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
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
                flat = flat.div_(self.backend.size / self.predivide)
            offset = 0
            for p in b.params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
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
            yield sum(p.numel() * p.element_size() for p in b.params)
