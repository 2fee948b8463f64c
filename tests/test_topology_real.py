"""Topology detection inside real ranks: started by Open MPI's mpirun and by torchrun."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import HERE

SCRIPT = os.path.join(HERE, "scripts", "print_topology.py")
pytestmark = pytest.mark.integration

ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _topologies(output: str):
    found = [json.loads(line.split("TOPOLOGY ", 1)[1]) for line in output.splitlines() if "TOPOLOGY " in line]
    return sorted(found, key=lambda t: t["rank"])


def _expect_two_local_ranks(found, source):
    assert [t["rank"] for t in found] == [0, 1]
    for t in found:
        assert t["source"] == source
        assert (t["size"], t["local_size"], t["node_rank"], t["num_nodes"]) == (2, 2, 0, 1)
        assert t["local_rank"] == t["rank"]
        assert t["threads"] >= 1
        assert t["device"] in ("cpu", f"cuda:{t['local_rank']}")


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_under_real_mpirun():
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, SCRIPT],
                          env={**os.environ, **ROOT_ENV}, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    _expect_two_local_ranks(_topologies(proc.stdout), "openmpi")


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_under_real_torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    proc = subprocess.run(cmd + ["--nproc-per-node", "2", "--standalone", SCRIPT], env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    _expect_two_local_ranks(_topologies(proc.stdout), "torchrun")
