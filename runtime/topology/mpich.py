"""MPICH / Intel MPI / MVAPICH (Hydra's mpiexec)."""
from __future__ import annotations

from .base import MPIVariables


class MPICHEnvironment(MPIVariables):
    """MPICH / Intel MPI (Hydra's mpiexec): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS."""

    name = "mpich"
    RANK, SIZE = "PMI_RANK", "PMI_SIZE"
    LOCAL_RANK, LOCAL_SIZE = "MPI_LOCALRANKID", "MPI_LOCALNRANKS"
