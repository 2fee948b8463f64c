"""lmsdp.comm: gradient allreduce backends (Horovod, torch.distributed).

```
backend = get_backend(CommConfig(...) | "auto" | "horovod" | "torch", device=None)
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

import os
from typing import Optional, Union

import torch

from .base import STAT_KEYS, Backend, CommError, info, load_trace, merge_traces
from .config import CommConfig

__all__ = ["CommConfig", "CommError", "Backend", "get_backend", "horovod_available", "STAT_KEYS",
           "load_trace", "merge_traces"]

_announced = False


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (its extension built against this torch)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or OSError/undefined symbol from a mismatched build
        return False
    return True


def _launched_by_torchrun() -> bool:
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ and "HOROVOD_RANK" not in os.environ
            and "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMIX_RANK" not in os.environ)


def get_backend(config: Union[CommConfig, str] = "auto", device: Optional[torch.device] = None) -> Backend:
    """Initialize and return the backend named by ``config`` (or by the string itself).

    ``auto`` takes Horovod when it imports, unless the process was started by torchrun (Horovod
    cannot join a torchrun rendezvous), else torch.distributed; rank 0 prints the choice once."""
    global _announced
    cfg = CommConfig(backend=config) if isinstance(config, str) else config
    name = cfg.backend
    if name not in ("auto", "horovod", "torch"):
        raise ValueError(f"comm backend {name!r}: choose auto, horovod or torch")
    chosen = name
    if name == "auto":
        chosen = "horovod" if (not _launched_by_torchrun() and horovod_available()) else "torch"
    if chosen == "horovod":
        from .horovod_backend import HorovodBackend
        backend: Backend = HorovodBackend(cfg, device)
    else:
        from .torch_backend import TorchBackend
        backend = TorchBackend(cfg, device)
    if name == "auto" and not _announced and backend.rank == 0:
        info(f"comm backend: {backend.description}")
    if name == "auto":
        _announced = True
    return backend
