"""Open MPI's mpirun (and horovodrun on top of it)."""
from __future__ import annotations

from .base import MPIVariables


class OpenMPIEnvironment(MPIVariables):
    """Open MPI's mpirun (and horovodrun on top of it): OMPI_COMM_WORLD_*."""

    name = "openmpi"
    RANK, SIZE = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
    LOCAL_RANK, LOCAL_SIZE = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"
