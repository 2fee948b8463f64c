"""The comm backends lmsdp knows, by name. ``comm.backend`` choices, the ``auto`` rule and the README
table come from here; a new backend is one ``BACKENDS.register`` line (and a ``Backend`` subclass).

Torch-free on import: targets are imported only when a backend is created."""
from __future__ import annotations

from typing import Any

from lmsdp.runtime.registry import Registry

BACKENDS = Registry("comm backend")


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (its extension built against this torch)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or OSError/undefined symbol from a mismatched build
        return False
    return True


def _horovod_usable(topology: Any) -> bool:
    # Horovod cannot join a torchrun rendezvous; elsewhere it is the first choice when it imports.
    return topology.source != "torchrun" and horovod_available()


BACKENDS.register("horovod", "lmsdp.comm.horovod_backend:HorovodBackend",
                  "Horovod: DistributedOptimizer, tensor fusion, Adasum, fp16 compression (MPI or Gloo controller)",
                  usable=_horovod_usable)
BACKENDS.register("torch", "lmsdp.comm.torch_backend:TorchBackend",
                  "torch.distributed: NCCL on GPU, gloo on CPU; bucketed allreduce as gradients become ready")
