"""The comm backends lmsdp knows, by name. ``comm.backend`` choices, the ``auto`` rule and the README
table come from here; a new backend is one ``BACKENDS.register`` line (and a ``Backend`` subclass).

Torch-free on import: targets are imported only when a backend is created."""
from __future__ import annotations

from typing import Any

from lmsdp.runtime.registry import Registry

BACKENDS = Registry("comm backend")
STRATEGIES = Registry("comm strategy")


def horovod_available() -> bool:
    """True when ``horovod.torch`` imports (its extension built against this torch)."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or OSError/undefined symbol from a mismatched build
        return False
    return True


def _horovod_usable(topology: Any, strategy: str = "replicate", tensor_parallel: bool = False) -> bool:
    # Horovod cannot join a torchrun rendezvous, has no sharding and no device mesh (tensor
    # parallelism); elsewhere it is the first choice when it imports.
    return (strategy_backends(strategy) is None and not tensor_parallel and topology.source != "torchrun"
            and horovod_available())


def strategy_backends(strategy: str) -> Any:
    """The backends a strategy runs on (None: every backend)."""
    return SHARDING_BACKENDS if strategy == "shard" else None


SHARDING_BACKENDS = ("torch",)  # FSDP2 runs on torch.distributed process groups only


BACKENDS.register("horovod", "lmsdp.comm.horovod_backend:HorovodBackend",
                  "Horovod: DistributedOptimizer, tensor fusion, Adasum, fp16 compression (MPI or Gloo controller)",
                  usable=_horovod_usable)
BACKENDS.register("torch", "lmsdp.comm.torch_backend:TorchBackend",
                  "torch.distributed: NCCL on GPU, gloo on CPU; bucketed allreduce as gradients become ready")

STRATEGIES.register("replicate", "lmsdp.comm.replicate:ReplicateStrategy",
                    "every rank holds the whole model and optimizer; gradients allreduced (DDP / Horovod style)")
STRATEGIES.register("shard", "lmsdp.comm.shard:ShardStrategy",
                    "parameters, gradients and optimizer state sharded across ranks with torch FSDP2 "
                    "(fully_shard per block, all-gather in forward/backward, reduce-scatter of gradients)")
