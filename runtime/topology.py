"""Where this rank sits: rank, local rank, size, node, device, thread share and rendezvous address.

The only reader of launcher variables in lmsdp (like Lightning's ``ClusterEnvironment``): the
launcher, the comm backends and the swap engine all ask this module.

One small class per launch environment (Open MPI, MPICH/Hydra, torchrun, Slurm srun, PMIx, single
process), each with ``detect()`` returning a ``Topology`` or ``None`` when its variables are absent.
``detect_topology()`` tries them in a fixed order and checks the result, so a broken environment is
a ``TopologyError`` with a hint instead of a hang in the first collective.

Order matters: Open MPI ranks also carry PMIX_* (and Slurm's variables when mpirun runs inside an
allocation); torchrun workers started by srun inherit SLURM_PROCID (the node's index, not the
worker's). So the launcher closest to the process wins: Open MPI, MPICH, torchrun, Slurm, PMIx.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Type

from . import env as envvars
from .errors import TopologyError

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


# --------------------------------------------------------------------------------------------
# one class per environment


def _int(env: Env, name: str, source: str) -> int:
    value = env.get(name, "")
    try:
        return int(value.strip())
    except ValueError:
        raise TopologyError(f"{source}: {name}={value!r} is not an integer",
                            hint="the launcher's environment is broken; unset stray variables") from None


def _first_int(env: Env, names: List[str], source: str) -> Optional[int]:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name, source)
    return None


class Environment:
    """Base: ``detect(env)`` returns a Topology when this launcher started the process, else None."""

    name = "?"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        raise NotImplementedError


class _MPIVariables(Environment):
    """An MPI launcher that exports rank/size and (optionally) local rank/size under its own names.
    Neither Open MPI nor Hydra exports a node index; with by-slot mapping it is rank // local_size."""

    RANK, SIZE, LOCAL_RANK, LOCAL_SIZE = "", "", "", ""

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if cls.RANK not in env or cls.SIZE not in env:
            return None
        rank = _int(env, cls.RANK, cls.name)
        size = _int(env, cls.SIZE, cls.name)
        local_rank = _first_int(env, [cls.LOCAL_RANK], cls.name)
        local_size = _first_int(env, [cls.LOCAL_SIZE], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        return Topology(rank, local_rank, size, local_size, rank // max(1, local_size), cls.name, mpi_world=True)


class OpenMPIEnvironment(_MPIVariables):
    """Open MPI's mpirun (and horovodrun on top of it): OMPI_COMM_WORLD_*."""

    name = "openmpi"
    RANK, SIZE = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
    LOCAL_RANK, LOCAL_SIZE = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"


class MPICHEnvironment(_MPIVariables):
    """MPICH / Intel MPI (Hydra's mpiexec): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS."""

    name = "mpich"
    RANK, SIZE = "PMI_RANK", "PMI_SIZE"
    LOCAL_RANK, LOCAL_SIZE = "MPI_LOCALRANKID", "MPI_LOCALNRANKS"


class TorchrunEnvironment(Environment):
    """torchrun / torch.distributed.run (or any env:// launch): RANK, WORLD_SIZE, and optionally
    LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT."""

    name = "torchrun"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if not all(k in env for k in ("RANK", "WORLD_SIZE")):
            return None  # torch's env:// contract; LOCAL_RANK is optional there (default: one host)
        rank = _int(env, "RANK", cls.name)
        size = _int(env, "WORLD_SIZE", cls.name)
        local_rank = _first_int(env, ["LOCAL_RANK"], cls.name)
        local_size = _first_int(env, ["LOCAL_WORLD_SIZE"], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        node = _first_int(env, ["GROUP_RANK"], cls.name)
        node = rank // max(1, local_size) if node is None else node
        port = _first_int(env, ["MASTER_PORT"], cls.name)
        return Topology(rank, local_rank, size, local_size, node, cls.name,
                        main_address=env.get("MASTER_ADDR", "127.0.0.1") if port is not None else None,
                        main_port=port)


class SlurmEnvironment(Environment):
    """A task of an srun step: SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_(STEP_)NTASKS.

    Only a step started by srun counts (SLURM_STEP_ID or SLURM_STEP_NUM_TASKS present): the batch
    script itself also has SLURM_PROCID=0, and there lmsrun must start the ranks, not become one."""

    name = "slurm"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if "SLURM_PROCID" not in env:
            return None
        if not any(k in env for k in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")):
            return None
        rank = _int(env, "SLURM_PROCID", cls.name)
        size = _first_int(env, ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"], cls.name)
        if size is None:
            raise TopologyError("slurm: SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS",
                                hint="start ranks with srun -n N (or sbatch --ntasks)")
        local_rank = _first_int(env, ["SLURM_LOCALID"], cls.name) or 0
        node = _first_int(env, ["SLURM_NODEID"], cls.name) or 0
        local_size = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                    node)
        if local_size is None:
            local_size = _first_int(env, ["SLURM_NTASKS_PER_NODE"], cls.name) or size
        # srun --mpi=pmix (or pmi2) gives the tasks an MPI world; plain srun does not
        return Topology(rank, local_rank, size, local_size, node, cls.name,
                        mpi_world="PMIX_RANK" in env or "PMI_RANK" in env)


def _tasks_on_node(spec: str, node: int) -> Optional[int]:
    """Tasks on node ``node`` from Slurm's compressed list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: List[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    if not counts:
        return None
    return counts[node] if node < len(counts) else counts[-1]


@dataclass
class Allocation:
    """The Slurm allocation a launching process (the batch script, salloc's shell) runs in, on this
    node: how many tasks and CPUs lmsrun may start here. mpirun inside the allocation takes its slots
    from Slurm, so more ranks than ``tasks`` fail with 'not enough slots'."""

    job_id: str
    tasks: int
    cpus: int

    def describe(self) -> str:
        return f"Slurm job {self.job_id}: {self.tasks} task(s), {self.cpus} CPU(s) on this node"


def slurm_allocation(env: Optional[Env] = None) -> Optional[Allocation]:
    """This node's share of the Slurm job this process runs in, else None (no job, or counts unknown).

    Reads the job's counts, not a step's: SLURM_TASKS_PER_NODE ('2(x3),1') at SLURM_NODEID and
    SLURM_CPUS_ON_NODE (else SLURM_JOB_CPUS_PER_NODE); cores bound by a cgroup show in the affinity too."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job:
        return None
    node = _first_int(env, ["SLURM_NODEID"], "slurm") or 0
    tasks = _tasks_on_node(env.get("SLURM_TASKS_PER_NODE", ""), node)
    cpus = _first_int(env, ["SLURM_CPUS_ON_NODE"], "slurm")
    if cpus is None:
        cpus = _tasks_on_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""), node)
    if tasks is None or cpus is None or tasks < 1 or cpus < 1:
        return None
    return Allocation(job, tasks, cpus)


class PMIxEnvironment(Environment):
    """Any PMIx launcher (e.g. prterun): PMIX_RANK; size from PMIX_SIZE or the Slurm/Open MPI variables."""

    name = "pmix"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if "PMIX_RANK" not in env:
            return None
        rank = _int(env, "PMIX_RANK", cls.name)
        size = _first_int(env, ["PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"],
                          cls.name)
        if size is None:
            raise TopologyError(f"pmix: PMIX_RANK={rank} is set but the job size is unknown",
                                hint="export PMIX_SIZE (or start ranks with mpirun / srun -n N)")
        local_rank = _first_int(env, ["PMIX_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"], cls.name)
        local_size = _first_int(env, ["PMIX_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        node = _first_int(env, ["PMIX_NODE_RANK", "SLURM_NODEID"], cls.name)
        node = rank // max(1, local_size) if node is None else node
        return Topology(rank, local_rank, size, local_size, node, cls.name, mpi_world=True)


class SingleEnvironment(Environment):
    """No launcher: one process, rank 0 of 1."""

    name = "single"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        return Topology()


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


def advertised_address(env: Optional[Env] = None) -> str:
    """The address other hosts reach rank 0 at: ``LMSDP_MASTER_ADDR``, else this host's resolved name."""
    env = os.environ if env is None else env
    import socket

    return env.get(envvars.MASTER_ADDR) or socket.gethostbyname(socket.getfqdn())


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


def validate(topology: Topology, env: Env) -> None:
    """Inconsistent numbers are errors now, not a hang in the first collective later."""
    t, src = topology, topology.source
    if t.size < 1 or t.local_size < 1:
        raise TopologyError(f"{src}: size {t.size} / local size {t.local_size} must be >= 1")
    if not 0 <= t.rank < t.size:
        raise TopologyError(f"{src}: rank {t.rank} is outside 0..{t.size - 1}",
                            hint="stale rank variables from an outer launcher? unset them")
    if not 0 <= t.local_rank < t.local_size:
        raise TopologyError(f"{src}: local rank {t.local_rank} is outside 0..{t.local_size - 1}")
    if t.local_size > t.size:
        raise TopologyError(f"{src}: {t.local_size} ranks on this node but only {t.size} in the job")
    if src == SlurmEnvironment.name or "SLURM_JOB_ID" in env:
        _check_slurm_counts(env)
    expected = env.get(envvars.EXPECTED_NP, "").strip()
    if expected:
        try:
            want = int(expected)
        except ValueError:
            raise TopologyError(f"LMSDP_EXPECTED_NP={expected!r} is not an integer") from None
        if want != t.size:
            raise TopologyError(f"the job was meant to have {want} ranks (LMSDP_EXPECTED_NP) but {src} "
                                f"started {t.size}", hint=_size_hint(src, env))


def _check_slurm_counts(env: Env) -> None:
    ntasks = env.get("SLURM_NTASKS", "").strip()
    nodes = env.get("SLURM_JOB_NUM_NODES", "").strip() or env.get("SLURM_NNODES", "").strip()
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").strip()
    if not (ntasks.isdigit() and nodes.isdigit() and per_node.isdigit()):
        return
    if int(ntasks) != int(nodes) * int(per_node):
        raise TopologyError(
            f"slurm: SLURM_NTASKS={ntasks} but SLURM_JOB_NUM_NODES={nodes} x SLURM_NTASKS_PER_NODE={per_node} "
            f"= {int(nodes) * int(per_node)}",
            hint="give sbatch either --ntasks or --nodes with --ntasks-per-node, consistently")


def _size_hint(source: str, env: Env) -> str:
    if source == SlurmEnvironment.name or "SLURM_JOB_ID" in env:
        return (f"check SLURM_NTASKS={env.get('SLURM_NTASKS', '?')} against nodes "
                f"({env.get('SLURM_JOB_NUM_NODES', '?')}) x tasks per node "
                f"({env.get('SLURM_NTASKS_PER_NODE', '?')}) in the sbatch header, and srun -n")
    if source in (OpenMPIEnvironment.name, MPICHEnvironment.name):
        return "mpirun -np (or the slots in -H / --hostfile) differs from what the job expects"
    if source == TorchrunEnvironment.name:
        return "check torchrun --nnodes x --nproc-per-node"
    return "the launcher started a different number of ranks than requested"


def environment_names() -> Dict[str, Callable[..., Optional[Topology]]]:
    """name -> detect, for messages and tests."""
    return {cls.name: cls.detect for cls in ENVIRONMENTS + [SingleEnvironment]}
