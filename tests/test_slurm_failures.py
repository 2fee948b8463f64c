"""One failing task ends the whole Slurm step (issue 28), on the real local cluster
(tests/slurm_cluster.py, the session's shared one-node cluster).

Task 0 of two fails at each point a real job fails: its factory module cannot be imported (config
check, before anything started), the comm backend's rendezvous, the model build, a training step;
with the Horovod and the torch backends; under ``srun`` directly and through ``lmsrun slurm
--submit``. Task 1 is healthy and would wait for task 0 for good. Each test prints the time from task
0's error file (written when it failed) to the end of the step, requires it under BOUND_S, requires
the cause on stderr before MPI's abort banner and no traceback from task 1, and that no task is left.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from lmsdp.runtime.abort import ABORT_WAIT_S, ends_job_on_failure, slurm_step
from lmsdp.runtime.error_file import ErrorRecord, read_errors
from lmsdp.runtime.topology import detect_launched

from .slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)
from .support import LMSRUN, SCRIPTS, TINY

BOUND_S = 15.0
# failure point -> (model.factory, model.kwargs, what task 0's line says)
POINTS: Dict[str, tuple] = {
    "import": ("rank0_import_fails:make", {}, "cannot import module 'rank0_import_fails'"),
    "rendezvous": ("rank0_faults:rendezvous_fails", {}, "injected: task 0 cannot"),
    "build": ("rank0_faults:build_fails", {}, "injected: task 0 cannot build its model"),
    "train": ("failing_model:make", {"fail_rank": 0, "fail_step": 2, "fail": "raise"}, "injected failure at step 2"),
}


def job_sets(point: str, backend: str, marker: str) -> List[str]:
    factory, kwargs, _ = POINTS[point]
    items = [f"model.factory={factory}", f"model.kwargs={json.dumps(kwargs)}", f"comm.backend={backend}",
             "launch.threads=1", "train.steps=4", f"name={marker}"]
    return [arg for item in items for arg in ("--set", item)]


def cluster_env(cluster: SlurmCluster, **extra: str) -> Dict[str, str]:
    env = cluster.env
    env["PYTHONPATH"] = SCRIPTS + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return {**env, **extra}


def srun_two_tasks(cluster: SlurmCluster, marker: str, errors: Path, program: List[str]) -> subprocess.CompletedProcess:
    """``srun --mpi=pmix -n 2 -J MARKER PROGRAM`` with LMSDP_ERROR_DIR=errors; waits for its end."""
    command = ["srun", "--mpi=pmix", "-n", "2", "-J", marker, *program]
    try:
        return subprocess.run(command, env=cluster_env(cluster, LMSDP_ERROR_DIR=str(errors)), cwd=errors.parent,
                              capture_output=True, text=True, timeout=120)
    finally:  # a step that did not end (the bug) must not outlive the test
        cluster.run("scancel", "--signal=KILL", "-n", marker, check=False)


def first_failure(errors: Path) -> ErrorRecord:
    records = read_errors(str(errors))
    assert records, f"no error file in {errors}"
    assert records[0].rank == 0, f"the first failure is rank {records[0].rank}'s: {records[0].reason}"
    return records[0]


def assert_reported(stderr: str, point: str) -> None:
    """Task 0's cause first, then the abort; task 1 prints no traceback."""
    cause = POINTS[point][2]
    assert cause in stderr, stderr
    if "MPI_ABORT was invoked" in stderr:
        assert stderr.index(cause) < stderr.index("MPI_ABORT was invoked"), stderr
    assert stderr.count("Traceback (most recent call last)") <= 1, stderr  # task 0's own, when not a user error


def assert_nothing_left(cluster: SlurmCluster, marker: str, job_id: str = "") -> None:
    """No step of the job named ``marker`` (srun's own) or of ``job_id`` is left, and no process with
    ``marker`` on its command line (every task has it: --set name=MARKER)."""
    steps = cluster.run("squeue", "-h", "-s", "-o", "%i %j", check=False).stdout.splitlines()
    ours = [s for s in steps if marker in s or (job_id and s.startswith(f"{job_id}."))]
    assert not ours, f"steps still there: {ours}"
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                left.append(proc)
        except psutil.Error:
            pass
    assert not left, f"tasks left running: {left}"


@pytest.mark.parametrize("launcher, env, ends", [
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "0"}, {}, True),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, {}, True),     # a user's own mpirun
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, {"LMSDP_LAUNCHED": "1"}, False),  # lmsrun's
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}, {}, False),  # one task
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}, {}, False),            # torchrun ends (or restarts) itself
    ({}, {}, False),                                                               # no launcher
], ids=["srun", "own-mpirun", "lmsrun-mpirun", "one-task", "torchrun", "none"])
def test_who_ends_the_job_on_failure(launcher: Dict[str, str], env: Dict[str, str], ends: bool) -> None:
    variables = {**launcher, **env}
    assert ends_job_on_failure(detect_launched(variables), variables) is ends


def test_slurm_step_names_job_and_step() -> None:
    assert slurm_step({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}) == "42.3"
    assert slurm_step({"SLURM_JOB_ID": "42"}) is None  # the batch shell: no step to cancel


@pytest.mark.parametrize("backend", ["horovod", "torch"])
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.integration
@pytest.mark.slurm
def test_srun_one_failing_task_ends_the_step(slurm_cluster: SlurmCluster, tmp_path: Path, point: str,
                                             backend: str) -> None:
    marker = "m" + uuid.uuid4().hex[:12]
    errors = tmp_path / "errors"
    proc = srun_two_tasks(slurm_cluster, marker, errors, [LMSRUN, TINY, "--output-dir", str(tmp_path / "run"),
                                                         *job_sets(point, backend, marker)])
    ended = time.time()
    failure = first_failure(errors)
    took = ended - failure.time
    print(f"\n[srun, {backend}, fails in {point}] step ended {took:.1f} s after task 0 failed; "
          f"srun exit {proc.returncode}")
    assert proc.returncode != 0, proc.stderr
    assert took < BOUND_S, f"step ended {took:.1f} s after the failure:\n{proc.stderr}"
    assert_reported(proc.stderr, point)
    assert_nothing_left(slurm_cluster, marker)


@pytest.mark.integration
@pytest.mark.slurm
def test_srun_failure_while_peers_have_not_started_mpi_cancels_the_step(slurm_cluster: SlurmCluster,
                                                                        tmp_path: Path) -> None:
    """Task 1 is still building its model (no MPI yet), so MPI_Init on task 0 cannot complete: after
    ABORT_WAIT_S task 0 cancels its step (scancel --signal=KILL JOB.STEP)."""
    marker = "m" + uuid.uuid4().hex[:12]
    errors = tmp_path / "errors"
    sets = ["--set", "model.factory=rank0_faults:build_fails_while_peers_build_slowly", "--set", "model.kwargs={}",
            "--set", "comm.backend=horovod", "--set", f"name={marker}"]
    proc = srun_two_tasks(slurm_cluster, marker, errors, [LMSRUN, TINY, *sets])
    took = time.time() - first_failure(errors).time
    print(f"\n[srun, horovod, fails in build, task 1 still building] step ended {took:.1f} s after task 0 "
          f"failed; srun exit {proc.returncode}")
    assert proc.returncode != 0 and ABORT_WAIT_S <= took < BOUND_S, proc.stderr
    assert "injected: task 0 cannot build its model" in proc.stderr
    assert "cancelling step" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert_nothing_left(slurm_cluster, marker)


def job_end_epoch(fields: Dict[str, str]) -> float:
    """scontrol's EndTime (local time, whole seconds) as an epoch; +1 s: it is rounded down."""
    return time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S")) + 1.0


@pytest.mark.parametrize("point, backend", [("build", "torch"), ("train", "horovod")])
@pytest.mark.integration
@pytest.mark.slurm
def test_submitted_job_with_a_failing_task_ends_and_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                                  point: str, backend: str) -> None:
    marker = "m" + uuid.uuid4().hex[:12]
    out = tmp_path / "run"
    command = [LMSRUN, "slurm", TINY, "--nodes", "1", "--gpus-per-node", "0", "--time", "00:05:00", "--submit", "--requeue",
               "--output", str(tmp_path / "job.sbatch"), "--set", f"train.output_dir={out}",
               *job_sets(point, backend, marker)]
    proc = subprocess.run(command, env=cluster_env(slurm_cluster), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = (tmp_path / "job.sbatch").read_text()
    assert "--kill-on-bad-exit=1" in script and "--requeue" in script
    job_id = proc.stdout.strip()
    job = slurm_cluster.wait(job_id, timeout=180)
    log = (out / f"slurm-{job_id}.out").read_text(errors="replace")
    failure = first_failure(out / "errors")
    took = job_end_epoch(job.fields) - failure.time
    print(f"\n[sbatch, {backend}, fails in {point}] job ended {took:.1f} s after task 0 failed; "
          f"state {job.state} {job.exit_code}")
    assert job.state == "FAILED" and job.restarts == 0, f"{job.state} restarts={job.restarts}:\n{log}"
    assert "a task failed (not a preemption: no requeue)" in log and "requeueing" not in log, log
    assert took < BOUND_S, f"job ended {took:.1f} s after the failure:\n{log}"
    assert_reported(log, point)
    assert_nothing_left(slurm_cluster, marker, job_id)


@pytest.mark.integration
@pytest.mark.slurm
def test_srun_script_mode_horovod_script_failing_on_task_0_ends_the_step(slurm_cluster: SlurmCluster,
                                                                         tmp_path: Path) -> None:
    """Script mode: the user's Horovod script (MPI up without mpi4py) raises on task 0."""
    marker = "m" + uuid.uuid4().hex[:12]
    errors = tmp_path / "errors"
    proc = srun_two_tasks(slurm_cluster, marker, errors, [
        LMSRUN, "--", sys.executable, os.path.join(SCRIPTS, "failing_script.py"), "--how", "horovod",
        "--fail-rank", "0", "--marker", marker])
    took = time.time() - first_failure(errors).time
    print(f"\n[srun, script mode, horovod script fails] step ended {took:.1f} s after task 0 failed; "
          f"srun exit {proc.returncode}")
    assert proc.returncode != 0 and took < BOUND_S, proc.stderr
    assert "horovod script failed on rank 0" in proc.stderr
    assert proc.stderr.index("horovod script failed on rank 0") < proc.stderr.index("MPI_ABORT was invoked")
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    assert_nothing_left(slurm_cluster, marker)
