"""Slurm: a task of an srun step, and the allocation a launching process runs in."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

from ..errors import TopologyError
from .base import Environment, first_int, read_int
from .model import Env, Topology


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
        rank = read_int(env, "SLURM_PROCID", cls.name)
        size = first_int(env, ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"], cls.name)
        if size is None:
            raise TopologyError("slurm: SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS",
                                hint="start ranks with srun -n N (or sbatch --ntasks)")
        local_rank = first_int(env, ["SLURM_LOCALID"], cls.name) or 0
        node = first_int(env, ["SLURM_NODEID"], cls.name) or 0
        local_size = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                    node)
        if local_size is None:
            local_size = first_int(env, ["SLURM_NTASKS_PER_NODE"], cls.name) or size
        # srun --mpi=pmix (or pmi2) gives the tasks an MPI world; plain srun does not
        return Topology(rank, local_rank, size, local_size, node, cls.name,
                        mpi_world="PMIX_RANK" in env or "PMI_RANK" in env)


def tasks_on_node(spec: str, node: int) -> Optional[int]:
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
    node = first_int(env, ["SLURM_NODEID"], "slurm") or 0
    tasks = tasks_on_node(env.get("SLURM_TASKS_PER_NODE", ""), node)
    cpus = first_int(env, ["SLURM_CPUS_ON_NODE"], "slurm")
    if cpus is None:
        cpus = tasks_on_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""), node)
    if tasks is None or cpus is None or tasks < 1 or cpus < 1:
        return None
    return Allocation(job, tasks, cpus)
