"""Consistency checks of a detected Topology: inconsistent numbers fail now, not as a hang later."""
from __future__ import annotations

from .. import env as envvars
from ..errors import TopologyError
from .model import Env, Topology
from .mpich import MPICHEnvironment
from .openmpi import OpenMPIEnvironment
from .slurm import SlurmEnvironment
from .torchrun import TorchrunEnvironment


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
    # an MPI rank on another node of the allocation runs inside the step that started Open MPI's
    # daemon there (srun -n 1 per node): that step's SLURM_NTASKS says nothing about the job
    daemon_step = src != SlurmEnvironment.name and "SLURM_STEP_ID" in env
    if src == SlurmEnvironment.name or ("SLURM_JOB_ID" in env and not daemon_step):
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
