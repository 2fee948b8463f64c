"""Where this rank sits: rank, local rank, size, node, device, thread share and rendezvous address.

The only reader of launcher variables in lmsdp (this package) (like Lightning's ``ClusterEnvironment``): the
launcher, the comm backends and the swap engine all ask this module.

One small class per launch environment, one file each (Open MPI, MPICH/Hydra, torchrun, Slurm srun, PMIx, single
process), each with ``detect()`` returning a ``Topology`` or ``None`` when its variables are absent.
``detect_topology()`` tries them in a fixed order and checks the result, so a broken environment is
a ``TopologyError`` with a hint instead of a hang in the first collective.

Order matters: Open MPI ranks also carry PMIX_* (and Slurm's variables when mpirun runs inside an
allocation); torchrun workers started by srun inherit SLURM_PROCID (the node's index, not the
worker's). So the launcher closest to the process wins: Open MPI, MPICH, torchrun, Slurm, PMIx.
"""
from __future__ import annotations

from .base import Environment, MPIVariables
from .checks import validate
from .detect import (ENVIRONMENTS, detect_launched, detect_topology, environment_names, rank_hint,
                     unreachable_world)
from .model import Env, Topology, check_devices, cpu_share
from .mpich import MPICHEnvironment
from .openmpi import OpenMPIEnvironment
from .pmix import PMIxEnvironment
from .single import SingleEnvironment
from .slurm import Allocation, SlurmEnvironment, slurm_allocation, tasks_on_node
from .torchrun import TorchrunEnvironment
from ..network import advertised_address

__all__ = [
    "Allocation", "ENVIRONMENTS", "Env", "Environment", "MPICHEnvironment", "MPIVariables", "OpenMPIEnvironment",
    "PMIxEnvironment", "SingleEnvironment", "SlurmEnvironment", "Topology", "TorchrunEnvironment",
    "advertised_address", "check_devices", "cpu_share", "detect_launched", "detect_topology", "environment_names",
    "rank_hint", "slurm_allocation", "tasks_on_node", "unreachable_world", "validate",
]
