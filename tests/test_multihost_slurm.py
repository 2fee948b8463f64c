"""Slurm across two hosts: one slurmd in each namespace host (tests/netns_cluster.py), slurmctld on the
bridge address (the DESIGN.md recipe), running the scripts ``lmsrun slurm`` generates, with
``srun --mpi=pmix`` and with ``mpirun`` inside the allocation, one rank per node; and a preemption
(SIGTERM to the step -> checkpoint -> requeue -> resume) that ends bit-identical to an uninterrupted run.
Everything a job touches lives outside /tmp (each host has its own)."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.netns_cluster import started
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster
from tests.support import LMSRUN, SCRIPTS, TINY

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.mpi]
STEPS = 10
TRAIN = [f"train.steps={STEPS}", "launch.np=1", "comm.backend=torch", "model.kwargs.delay=0.3",
         "train.deterministic=true", "train.log_every=1"]


@pytest.fixture(scope="module")
def slurm_hosts():
    for hosts in started(2):
        root = os.path.join(hosts.folder, "slurm")
        os.makedirs(root)
        try:
            cluster = SlurmCluster(root, hosts=hosts).start()
        except ClusterUnavailable as exc:
            pytest.skip(f"no Slurm on the namespace hosts: {exc}")
        try:
            yield cluster
        finally:
            cluster.stop()


def submit(cluster, name, launcher, *flags, sets=()):
    """Generate the 2-node script for TINY and submit it; returns (job id, output folder)."""
    base = Path(cluster.hosts.folder) / name
    out, script = base / "run", base / "job.sbatch"
    base.mkdir()
    env = {**cluster.env, "PYTHONPATH": SCRIPTS}
    args = [LMSRUN, "slurm", TINY, "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00",
            "--launcher", launcher, "--output", str(script), *flags]
    for item in [*TRAIN, f"train.output_dir={out}", *sets]:
        args += ["--set", item]
    made = subprocess.run(args, env=env, capture_output=True, text=True, cwd=base, timeout=120)
    assert made.returncode == 0, made.stderr
    job = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                         cwd=base, timeout=60)
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0], out


def log(out, job_id):
    path = out / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def steps(out, rank):
    path = out / f"metrics.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def final_model(out):
    return torch.load(out / "checkpoints" / f"step-{STEPS:08d}.pt", map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def reference(slurm_hosts):
    job_id, out = submit(slurm_hosts, "reference", "srun")
    job = slurm_hosts.wait(job_id, timeout=300)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{log(out, job_id)}"
    return out


def test_srun_pmix_trains_one_rank_on_each_host(slurm_hosts, reference):
    assert [m["step"] for m in steps(reference, 1)] == list(range(1, STEPS + 1))
    assert json.loads((reference / "summary.json").read_text())["ranks"] == 2
    text = log(reference, re.search(r"slurm-(\d+)", " ".join(os.listdir(reference))).group(1))
    assert "on h[1-2]: 2 tasks" in text


def test_mpirun_inside_the_allocation_trains_across_the_hosts(slurm_hosts, reference):
    job_id, out = submit(slurm_hosts, "mpirun", "mpirun", sets=["train.steps=3"])
    job = slurm_hosts.wait(job_id, timeout=300)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{log(out, job_id)}"
    assert job.fields["NodeList"] == "h[1-2]"
    assert [m["step"] for m in steps(out, 1)] == [1, 2, 3]
    assert [m["loss"] for m in steps(out, 0)] == [m["loss"] for m in steps(reference, 0)][:3]


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_hosts, reference):
    job_id, out = submit(slurm_hosts, "preempted", "srun", "--requeue")
    import time

    deadline = time.monotonic() + 240
    while len(steps(out, 0)) < 2:
        assert time.monotonic() < deadline, log(out, job_id)
        time.sleep(0.2)
    slurm_hosts.run("scancel", "--signal=TERM", job_id)  # the step's tasks on both hosts
    job = slurm_hosts.wait(job_id, timeout=300)
    text = log(out, job_id)
    assert job.state == "COMPLETED" and job.restarts == 1, f"{job.state} {job.restarts}:\n{text}"
    assert "requeueing job" in text and "resumed from" in text
    assert [m["step"] for m in steps(out, 0)] == list(range(1, STEPS + 1))
    got, want = final_model(out), final_model(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
