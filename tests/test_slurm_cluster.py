"""`lmsrun slurm` scripts against a real single-node Slurm cluster (tests/slurm_cluster.py).

Every job trains the quickstart config (2 tasks, CPU), shortened with --set. One uninterrupted run is
the reference; the preemption tests stop a run part-way (scancel --signal=TERM to the tasks, or USR1
to the batch shell as --signal=B:USR1@N does), let it requeue or resubmit it, and require the final
weights to equal the reference's bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from .slurm_cluster import SlurmCluster, slurm_cluster, slurm_two_nodes  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

from tests.support import REPO_PATH as REPO
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
from tests.support import LMSRUN
STEPS = 16
# Shortened quickstart: every run of these tests uses the same settings, so their weights compare.
TRAIN = [f"train.steps={STEPS}", "train.batch_size=8", "train.checkpoint_every=0", "train.log_every=4",
         "launch.threads=1"]


@dataclass
class Run:
    """One generated script and where its job writes."""

    script: str
    out: Path

    def log(self, job_id: str) -> str:
        path = self.out / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"

    def metrics(self, rank: int) -> List[Dict]:
        path = self.out / f"metrics.rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def final_model(self) -> Dict[str, torch.Tensor]:
        path = self.out / "checkpoints" / f"step-{STEPS:08d}.pt"
        assert path.exists(), f"no final checkpoint {path}; have {sorted(os.listdir(path.parent))}"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]


def lmsrun_slurm(cluster: SlurmCluster, tmp: Path, *flags: str, sets: List[str] = ()) -> "tuple[Run, str]":
    """`lmsrun slurm QUICKSTART ... --output tmp/job.sbatch [flags]`; returns the run and its stdout."""
    run = Run(str(tmp / "job.sbatch"), tmp / "run")
    args = [LMSRUN, "slurm", QUICKSTART, "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00",
            "--output", run.script, *flags]
    for item in [*TRAIN, f"train.output_dir={run.out}", *sets]:
        args += ["--set", item]
    proc = subprocess.run(args, env=cluster.env, capture_output=True, text=True, cwd=tmp, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return run, proc.stdout


def generate(cluster: SlurmCluster, tmp: Path, *flags: str, sets: List[str] = ()) -> Run:
    """Write the script (no submission); returns the script and its output folder."""
    return lmsrun_slurm(cluster, tmp, *flags, sets=sets)[0]


def wait_for_steps(cluster: SlurmCluster, run: Run, job_id: str, steps: int, timeout: float = 180) -> None:
    """Until rank 0 has logged ``steps`` steps (the job is training, its signal handlers are in place)."""
    path = run.out / "metrics.rank0.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        job = cluster.job(job_id)
        assert job.state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} {job.state}:\n{run.log(job_id)}"
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not reach step {steps} in {timeout}s:\n{run.log(job_id)}")


def assert_same_weights(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"


def stop_step(log: str) -> int:
    """The step of the checkpoint written on the stop signal (from rank 0's log line)."""
    match = re.search(r"stop requested: checkpoint \S+ at step (\d+)", log)
    assert match, f"no 'stop requested' checkpoint in the log:\n{log}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run: srun template, 2 tasks, submitted through `lmsrun slurm --submit`."""
    run, stdout = lmsrun_slurm(slurm_cluster, tmp_path_factory.mktemp("reference"), "--submit")
    job_id = stdout.strip()
    assert job_id.isdigit(), stdout
    job = slurm_cluster.wait(job_id)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{run.log(job_id)}"
    run.job_id = job_id  # type: ignore[attr-defined]
    return run


def test_srun_script_trains_two_ranks_to_the_end(reference: Run) -> None:
    text = Path(reference.script).read_text()
    assert "srun --mpi=pmix" in text and "--ntasks-per-node=2" in text
    for rank in (0, 1):
        steps = [r["step"] for r in reference.metrics(rank)]
        assert steps == list(range(1, STEPS + 1)), f"rank {rank}: {steps}"
    summary = json.loads((reference.out / "summary.json").read_text())
    assert summary["ranks"] == 2
    assert (reference.out / "checkpoints" / f"step-{STEPS:08d}.pt").exists()
    assert not (reference.out / "metrics.rank2.jsonl").exists()


def test_mpirun_script_trains_two_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run = generate(slurm_cluster, tmp_path, "--launcher", "mpirun", sets=["train.steps=4"])
    assert "mpirun -np" in Path(run.script).read_text()
    job_id = slurm_cluster.sbatch(run.script)
    job = slurm_cluster.wait(job_id)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{run.log(job_id)}"
    for rank in (0, 1):
        assert [r["step"] for r in run.metrics(rank)] == [1, 2, 3, 4]
    assert json.loads((run.out / "summary.json").read_text())["ranks"] == 2


@pytest.mark.parametrize("launcher, template", [("srun", "template (b)"), ("mpirun", "template (c)")])
def test_two_node_scripts_train_one_rank_per_node(slurm_two_nodes: SlurmCluster, tmp_path: Path,
                                                 launcher: str, template: str) -> None:
    run = generate(slurm_two_nodes, tmp_path, "--nodes", "2", "--launcher", launcher,
                   sets=["launch.np=1", "train.steps=3"])
    text = Path(run.script).read_text()
    assert template in text and "#SBATCH --nodes=2" in text and "export LMSDP_EXPECTED_NP=2" in text
    job_id = slurm_two_nodes.sbatch(run.script)
    job = slurm_two_nodes.wait(job_id)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{run.log(job_id)}"
    assert job.fields["NodeList"] == "n[1-2]" and job.fields["NumTasks"] == "2"
    for rank in (0, 1):
        assert [r["step"] for r in run.metrics(rank)] == [1, 2, 3]
    assert json.loads((run.out / "summary.json").read_text())["ranks"] == 2


def test_scancel_term_checkpoints_then_requeued_job_matches_uninterrupted(
        slurm_cluster: SlurmCluster, reference: Run, tmp_path: Path) -> None:
    run = generate(slurm_cluster, tmp_path, "--requeue")
    job_id = slurm_cluster.sbatch(run.script)
    wait_for_steps(slurm_cluster, run, job_id, 2)
    slurm_cluster.run("scancel", "--signal=TERM", job_id)  # the job steps' tasks, not the batch shell
    job = slurm_cluster.wait(job_id, timeout=300)
    log = run.log(job_id)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{log}"
    assert job.restarts == 1, log
    stopped = stop_step(log)
    assert 2 <= stopped < STEPS
    assert "requeueing job" in log
    assert f"at step {stopped}/{STEPS}" in log and "resumed from" in log
    assert [r["step"] for r in run.metrics(0)] == list(range(1, STEPS + 1))
    assert_same_weights(run.final_model(), reference.final_model())


def test_usr1_to_batch_shell_checkpoints_and_resubmitted_mpirun_job_matches(
        slurm_cluster: SlurmCluster, reference: Run, tmp_path: Path) -> None:
    """What --signal=B:USR1@N does before the time limit, on the mpirun template, without requeue."""
    run = generate(slurm_cluster, tmp_path, "--launcher", "mpirun", "--no-requeue")
    first = slurm_cluster.sbatch(run.script)
    wait_for_steps(slurm_cluster, run, first, 2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", first)
    job = slurm_cluster.wait(first)
    log = run.log(first)
    assert job.state == "FAILED" and job.exit_code.startswith("138"), f"{job.state} {job.exit_code}:\n{log}"
    assert "batch shell got SIGUSR1" in log
    stopped = stop_step(log)
    assert 2 <= stopped < STEPS
    assert (run.out / "checkpoints" / f"step-{stopped:08d}.pt").exists()

    second = slurm_cluster.sbatch(run.script)  # the same script again: train.resume=true continues
    job = slurm_cluster.wait(second)
    log = run.log(second)
    assert job.state == "COMPLETED", f"{job.state} {job.exit_code}:\n{log}"
    assert f"at step {stopped}/{STEPS}" in log
    assert_same_weights(run.final_model(), reference.final_model())


def test_plain_scancel_checkpoints_and_ends_for_good_despite_requeue(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run = generate(slurm_cluster, tmp_path, "--requeue")
    job_id = slurm_cluster.sbatch(run.script)
    wait_for_steps(slurm_cluster, run, job_id, 2)
    slurm_cluster.run("scancel", job_id)  # TERM to the batch shell and the tasks: the user ends the job
    job = slurm_cluster.wait_gone(job_id)
    log = run.log(job_id)
    assert job.state == "CANCELLED" and job.restarts == 0, f"{job.state} restarts={job.restarts}:\n{log}"
    assert "batch shell got SIGTERM" in log and "requeueing" not in log
    stopped = stop_step(log)
    assert (run.out / "checkpoints" / f"step-{stopped:08d}.pt").exists()


def test_task_count_mismatch_is_a_clear_error(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run = generate(slurm_cluster, tmp_path)
    assert "LMSDP_EXPECTED_NP=2" in Path(run.script).read_text()
    # sbatch flags override the script's #SBATCH lines: only one task starts where two were meant.
    job_id = slurm_cluster.sbatch(run.script, "--ntasks-per-node=1")
    job = slurm_cluster.wait(job_id, timeout=120)
    log = run.log(job_id)
    assert job.state == "FAILED", f"{job.state}:\n{log}"
    assert job.exit_code.startswith("2:"), job.exit_code
    errors = [line for line in log.splitlines() if line.startswith("lmsrun: error:")]
    assert errors, log
    assert "LMSDP_EXPECTED_NP" in errors[0], errors[0]
    assert re.search(r"\b2\b", errors[0]) and re.search(r"\b1\b", errors[0]), errors[0]  # wanted vs started
    assert not (run.out / "metrics.rank0.jsonl").exists()


TUNE_JOB = """#!/bin/bash
#SBATCH --ntasks={tasks} --output={out}/slurm-%j.out
# what a user runs in a batch job: tune in the batch shell, then the written config, then tune as a step
set -u
cd {out}
{lmsrun} tune {config} --time-budget {budget}s --trial-steps 3 --warmup 1 --write {out}/t.yaml --json {out}/tune.json {flags}
echo "tune exit $?"
{lmsrun} {out}/t.yaml --set train.steps=2 --set train.progress=false --output-dir {out}/run
echo "run exit $?"
srun {lmsrun} tune {config}
echo "srun tune exit $?"
"""
TUNE_SMALL = ["model.kwargs={width: 8, num_classes: 10, stem: cifar}", "data.shape=[3, 16, 16]",
              "swap.enabled=false", "comm.backend=torch"]


def tune_job(cluster: SlurmCluster, out: Path, tasks: int, budget: int, *flags: str) -> "tuple[str, list, dict]":
    """Submit TUNE_JOB with ``tasks`` tasks; returns its log, tune's trials and the written config's summary."""
    import shlex

    out.mkdir()
    items = [*flags] + [a for item in TUNE_SMALL for a in ("--set", item)]
    script = out / "tune.sbatch"
    script.write_text(TUNE_JOB.format(tasks=tasks, out=out, lmsrun=LMSRUN, config=QUICKSTART, budget=budget,
                                      flags=shlex.join(items)))
    job_id = cluster.sbatch(str(script))
    job = cluster.wait(job_id, timeout=budget + 180)
    log = (out / f"slurm-{job_id}.out").read_text(errors="replace")
    assert job.state in ("COMPLETED", "FAILED"), f"{job.state}:\n{log}"
    assert "tune exit 0" in log and "run exit 0" in log, log
    trials = json.loads((out / "tune.json").read_text())["trials"]
    return log, trials, json.loads((out / "run" / "summary.json").read_text())


def test_tune_in_a_batch_job_measures_inside_the_allocation_and_its_config_runs_there(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    log, trials, summary = tune_job(slurm_cluster, tmp_path / "two", 2, 30)
    assert "Slurm job" in log and "2 task(s)" in log, log
    assert any(t["np"] == 2 and t["samples_per_s"] for t in trials), log  # mpirun's 2 slots from the allocation
    assert all(t["np"] <= 2 and not t["error"] for t in trials), log
    assert summary["ranks"] == json.loads((tmp_path / "two" / "tune.json").read_text())["pick"]["np"]
    # tune as the step's tasks: each refuses in one line, the step fails
    refusals = [line for line in log.splitlines() if line.startswith("lmsrun: error: tune: this process is rank")]
    assert len(refusals) == 2 and all("started by slurm" in line for line in refusals), log
    assert re.search(r"srun tune exit [1-9]", log), log


def test_tune_in_a_one_task_allocation_tries_one_rank(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The config asks for 2 ranks; the job has 1 task (1 CPU): mpirun -np 2 would fail 'not enough slots'."""
    log, trials, summary = tune_job(slurm_cluster, tmp_path / "one", 1, 20, "--exhaustive", "--max-batch", "16")
    assert "on 1 core(s)" in log and "1 task(s), 1 CPU(s) on this node, at most 1 rank(s)" in log, log
    assert trials and all((t["np"], t["threads"]) == (1, 1) and t["samples_per_s"] for t in trials), log
    assert summary["ranks"] == 1
