"""The Topology record (this rank's place in the job) and the per-node facts derived from it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from ..errors import TopologyError

if TYPE_CHECKING:
    import torch

Env = Mapping[str, str]


@dataclass
class Topology:
    """This rank's place in the job; ``source`` names the environment it was read from."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    node_rank: int = 0
    source: str = "single"
    mpi_world: bool = False              # an MPI world to rendezvous through (mpi4py) exists
    main_address: Optional[str] = None   # where rank 0's store listens, when the launcher says
    main_port: Optional[int] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        """Nodes in the job, assuming the same number of ranks on every node (block mapping)."""
        return max(1, -(-self.size // max(1, self.local_size)))

    def device(self) -> "torch.device":
        """``cuda:local_rank % device_count`` when CUDA is there, else CPU; refuses GPU sharing."""
        import torch  # here, not at import: rank detection must stay cheap

        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        check_devices(self, count, os.environ)
        return torch.device("cuda", self.local_rank % count)

    def threads(self, configured: int = 0) -> int:
        """Intra-op threads: ``configured`` if > 0, else this rank's share of the node's cores."""
        if configured > 0:
            return configured
        return cpu_share(self.local_size)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.size} local {self.local_rank}/{self.local_size} "
                f"node {self.node_rank} ({self.source})")


def check_devices(topology: Topology, device_count: int, env: Env) -> None:
    """More ranks on a node than visible GPUs means two ranks would share one GPU: an error.

    A single visible GPU with CUDA_VISIBLE_DEVICES set is the per-task binding of Slurm
    (--gpus-per-task) or a site wrapper: each rank sees only its own GPU, which is fine."""
    if device_count <= 0 or topology.local_size <= device_count:
        return
    if device_count == 1 and env.get("CUDA_VISIBLE_DEVICES", "").strip():
        return
    raise TopologyError(
        f"{topology.local_size} ranks on this node but only {device_count} GPU(s) visible "
        f"({topology.source})",
        hint=f"start at most {device_count} rank(s) per node (-np / -H host:{device_count}), "
             "or give each rank its own GPU through CUDA_VISIBLE_DEVICES")


def cpu_share(local_size: int) -> int:
    """Cores for one of ``local_size`` ranks on this node, never below 1.

    When the rank is already bound to fewer CPUs than the node has (srun --cpu-bind, mpirun
    --bind-to core), that set is its share; otherwise the node's cores are split evenly."""
    total = os.cpu_count() or 1
    try:
        bound = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        bound = total
    if bound < total:
        return max(1, bound)
    return max(1, total // max(1, local_size))
