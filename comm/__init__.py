"""lmsdp.comm: gradient allreduce backends (Horovod, torch.distributed).

```
backend = get_backend(CommConfig(...) | "auto" | "horovod" | "torch", device=None, topology=None)
backend.name, .rank, .size, .local_rank, .local_size, .device, .description
backend.broadcast_state(model, optimizer)        # rank 0 -> all (start and after resume)
optimizer = backend.wrap_optimizer(optimizer, model)
backend.allreduce(tensor, op="average"); backend.allgather_object(obj); backend.barrier()
backend.step_stats()  # once per step: allreduce_ms, allreduce_hidden_frac, comm_wait_ms, ...
backend.shutdown()
```
Failures of a collective (dead or stuck peer) raise :class:`CommError`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from lmsdp.runtime.chrome_trace import load_trace, merge_traces
from lmsdp.runtime.topology import Topology, detect_topology

from .base import Backend, CommError, info
from .timing import STAT_KEYS
from .config import CommConfig
from .registry import BACKENDS, horovod_available

__all__ = ["CommConfig", "CommError", "Backend", "BACKENDS", "get_backend", "horovod_available", "STAT_KEYS",
           "load_trace", "merge_traces"]

_announced = False


def get_backend(config: Union[CommConfig, str] = "auto", device: Optional[torch.device] = None,
                topology: Optional[Topology] = None) -> Backend:
    """Initialize and return the backend named by ``config`` (or by the string itself).

    ``auto`` takes the first backend of the registry (``comm/registry.py``) usable here: Horovod when
    it imports and the job was not started by torchrun, else torch.distributed; rank 0 prints the
    choice once. ``topology`` (default: detected) says where this rank is."""
    global _announced
    cfg = CommConfig(backend=config) if isinstance(config, str) else config
    topology = topology or detect_topology()
    from .mesh import wants_tensor_parallel

    entry = BACKENDS.resolve(cfg.backend, topology, cfg.strategy, wants_tensor_parallel(cfg.mesh))
    backend: Backend = entry.load()(cfg, device, topology)
    if cfg.backend == "auto" and not _announced and backend.rank == 0:
        info(f"comm backend: {backend.description}")
    if cfg.backend == "auto":
        _announced = True
    return backend
