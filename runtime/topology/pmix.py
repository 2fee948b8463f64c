"""Any PMIx launcher (prterun, srun --mpi=pmix without Open MPI's variables)."""
from __future__ import annotations

import os
from typing import Optional

from ..errors import TopologyError
from .base import Environment, first_int, read_int
from .model import Env, Topology


class PMIxEnvironment(Environment):
    """Any PMIx launcher (e.g. prterun): PMIX_RANK; size from PMIX_SIZE or the Slurm/Open MPI variables."""

    name = "pmix"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if "PMIX_RANK" not in env:
            return None
        rank = read_int(env, "PMIX_RANK", cls.name)
        size = first_int(env, ["PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"],
                          cls.name)
        if size is None:
            raise TopologyError(f"pmix: PMIX_RANK={rank} is set but the job size is unknown",
                                hint="export PMIX_SIZE (or start ranks with mpirun / srun -n N)")
        local_rank = first_int(env, ["PMIX_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"], cls.name)
        local_size = first_int(env, ["PMIX_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        node = first_int(env, ["PMIX_NODE_RANK", "SLURM_NODEID"], cls.name)
        node = rank // max(1, local_size) if node is None else node
        return Topology(rank, local_rank, size, local_size, node, cls.name, mpi_world=True)
