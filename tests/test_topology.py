"""Topology detection per launch environment, with patched variables (no processes started)."""
import os
import subprocess

import pytest

from lmsdp.launcher.config.errors import TopologyError
from lmsdp.runtime.topology import (SlurmEnvironment, Topology, check_devices, cpu_share, detect_launched,
                                     detect_topology)

from tests.support import HERE
from tests.support import LMSRUN

CASES = {
    "openmpi": ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "5"}, (5, 1, 8, 4, 1)),
    "mpich": ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (3, 1, 4, 2, 1)),
    "torchrun": ({"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                  "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, (6, 2, 8, 4, 1)),
    "slurm": ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_NTASKS": "6",
               "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
               "SLURM_JOB_ID": "7"}, (5, 1, 6, 2, 2)),
    "pmix": ({"PMIX_RANK": "2", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "2"}, (2, 0, 4, 2, 1)),
}


@pytest.mark.parametrize("source", sorted(CASES))
def test_each_environment(source):
    env, (rank, local_rank, size, local_size, node) = CASES[source]
    topology = detect_topology(env)
    assert topology.source == source
    assert (topology.rank, topology.local_rank, topology.size, topology.local_size, topology.node_rank) == \
        (rank, local_rank, size, local_size, node)
    assert topology.is_main == (rank == 0)


def test_single_process():
    topology = detect_topology({})
    assert topology == Topology() and topology.source == "single"
    assert detect_launched({}) is None


@pytest.mark.integration
def test_slurm_batch_script_is_not_a_rank():
    # sbatch's script has SLURM_PROCID=0 but no step: lmsrun must launch ranks there, not be one
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}
    assert SlurmEnvironment.detect(env) is None
    assert detect_launched(env) is None


def test_slurm_uneven_tasks_per_node():
    env = {"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS": "5", "SLURM_TASKS_PER_NODE": "2(x2),1"}
    topology = detect_topology(env)
    assert (topology.size, topology.local_size, topology.node_rank) == (5, 1, 2)


@pytest.mark.integration
def test_expected_np_mismatch_names_both_numbers():
    env = dict(CASES["openmpi"][0], LMSDP_EXPECTED_NP="16")
    with pytest.raises(TopologyError) as info:
        detect_topology(env)
    text = str(info.value)
    assert "16" in text and "8" in text and "mpirun -np" in text


def test_expected_np_mismatch_under_slurm_points_at_ntasks():
    env = dict(CASES["slurm"][0], LMSDP_EXPECTED_NP="8", SLURM_JOB_NUM_NODES="3", SLURM_NTASKS_PER_NODE="2")
    with pytest.raises(TopologyError) as info:
        detect_topology(env)
    text = str(info.value)
    assert "meant to have 8 ranks" in text and "started 6" in text
    assert "SLURM_NTASKS=6" in text and "tasks per node" in text


def test_slurm_ntasks_inconsistent_with_nodes_times_tasks_per_node():
    env = dict(CASES["slurm"][0], SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4")
    with pytest.raises(TopologyError, match=r"SLURM_NTASKS=6 but SLURM_JOB_NUM_NODES=2 x SLURM_NTASKS_PER_NODE=4"):
        detect_topology(env)


@pytest.mark.parametrize("env,words", [
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "rank 2 is outside 0..1"),
    ({"RANK": "0", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"}, "4 ranks on this node"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "not an integer"),
    ({"PMIX_RANK": "1"}, "job size is unknown"),
    ({"LMSDP_LAUNCHED": "1"}, "no MPI rank variables"),
])
def test_inconsistent_environment_is_an_error(env, words):
    with pytest.raises(TopologyError, match=words):
        detect_topology(env)


def test_more_local_ranks_than_gpus():
    with pytest.raises(TopologyError) as info:
        check_devices(Topology(rank=2, local_rank=2, size=4, local_size=4, source="openmpi"), 2, {})
    assert "4 ranks on this node but only 2 GPU" in str(info.value)
    assert "hint:" in str(info.value)
    check_devices(Topology(rank=1, local_rank=1, size=2, local_size=2), 2, {})  # one each: fine
    # one GPU per rank through CUDA_VISIBLE_DEVICES (srun --gpus-per-task): fine
    check_devices(Topology(rank=1, local_rank=1, size=2, local_size=2), 1, {"CUDA_VISIBLE_DEVICES": "1"})
    with pytest.raises(TopologyError):
        check_devices(Topology(rank=1, local_rank=1, size=2, local_size=2), 1, {})


def test_device_is_cpu_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: device is cuda:local_rank % count")
    assert str(Topology(local_rank=1, local_size=2, size=2, rank=1).device()) == "cpu"


def test_threads_split_cores():
    assert Topology().threads(configured=3) == 3
    cores = os.cpu_count() or 1
    bound = len(os.sched_getaffinity(0))
    expected = bound if bound < cores else max(1, cores // 2)
    assert Topology(local_size=2, size=2).threads() == expected == cpu_share(2)
    assert Topology(local_size=10 * cores, size=10 * cores).threads() >= 1


@pytest.mark.integration
def test_topology_error_from_cli_is_one_line():
    """A rank whose environment is wrong prints one lmsrun line and exits 2, no traceback."""
    env = dict(os.environ, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2", LMSDP_EXPECTED_NP="3",
               PYTHONPATH=os.path.join(HERE, "scripts"))
    proc = subprocess.run([LMSRUN, os.path.join(HERE, "scripts", "tiny.yaml")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("lmsrun: error: the job was meant to have 3 ranks"), proc.stderr


def test_mpi_rank_inside_the_daemon_step_on_another_node_ignores_that_steps_counts():
    """mpirun in a 2-node allocation starts its daemon on node 2 with srun -n 1: a rank there sees that
    step's SLURM_NTASKS=1 next to the job's 2 nodes x 1 task; not a mismatch of the job."""
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1"}
    assert detect_topology(env).rank == 1
    with pytest.raises(TopologyError, match="SLURM_NTASKS=1 but SLURM_JOB_NUM_NODES=2"):
        detect_topology({k: v for k, v in env.items() if k != "SLURM_STEP_ID"})
