"""Which launcher started this process: the environments tried in a fixed order, and the helpers
that read a rank variable without a full detection."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Type

from .. import env as envvars
from ..errors import TopologyError
from .base import Environment
from .checks import validate
from .mpich import MPICHEnvironment
from .model import Env, Topology
from .openmpi import OpenMPIEnvironment
from .pmix import PMIxEnvironment
from .single import SingleEnvironment
from .slurm import SlurmEnvironment
from .torchrun import TorchrunEnvironment

ENVIRONMENTS: List[Type[Environment]] = [
    OpenMPIEnvironment, MPICHEnvironment, TorchrunEnvironment, SlurmEnvironment, PMIxEnvironment,
]


_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", "PMIX_RANK", "SLURM_PROCID")


def rank_hint(env: Optional[Env] = None) -> int:
    """This process's rank from the first rank variable set, else 0, without checking the rest of
    the environment: for naming per-rank files, never for deciding who does what."""
    env = os.environ if env is None else env
    for var in _RANK_VARIABLES:
        value = env.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def unreachable_world(env: Optional[Env] = None) -> Optional[str]:
    """A launcher that started several ranks but left no MPI world or store address to meet through
    (horovodrun's Gloo mode, plain srun without --mpi=pmix): what to tell the user, else None."""
    env = os.environ if env is None else env
    for var, launcher in (("HOROVOD_SIZE", "horovodrun"), ("SLURM_STEP_NUM_TASKS", "srun without --mpi=pmix")):
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) > 1:
            return f"started by {launcher} ({var}={value})"
    return None


def detect_launched(env: Optional[Env] = None) -> Optional[Topology]:
    """The checked Topology when a launcher started this process as a rank, else None."""
    env = os.environ if env is None else env
    for cls in ENVIRONMENTS:
        topology = cls.detect(env)
        if topology is not None:
            validate(topology, env)
            return topology
    return None


def detect_topology(env: Optional[Env] = None) -> Topology:
    """This process's Topology: from the first launcher environment found, else a single process."""
    env = os.environ if env is None else env
    topology = detect_launched(env)
    if topology is None:
        if env.get(envvars.LAUNCHED) == "1":
            raise TopologyError("started by lmsrun but no MPI rank variables (OMPI_COMM_WORLD_*, PMI_*) found",
                                hint="is the mpirun on PATH a different MPI than the one lmsrun detected?")
        topology = Topology()
        validate(topology, env)
    return topology


def environment_names() -> Dict[str, Callable[..., Optional[Topology]]]:
    """name -> detect, for messages and tests."""
    return {cls.name: cls.detect for cls in ENVIRONMENTS + [SingleEnvironment]}
