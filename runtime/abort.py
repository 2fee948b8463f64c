"""A rank that fails ends the whole job, under any launcher (mpirun, srun, a user's own mpirun).

lmsrun's own mpirun needs nothing more: mpirun kills the job when a rank exits non-zero and lmsrun
reports the earliest error file. Other launchers do not: ``srun`` leaves the other tasks waiting in
their first collective (for the comm timeout, or for good), and ``srun --kill-on-bad-exit`` sends
them TERM first, which lmsdp's ranks take as "checkpoint and stop" (exit 143, a preemption to the
sbatch scripts) and cannot act on while blocked in a collective, so the step lingers until Slurm's
KillWait. So a failing rank, after its error line, aborts the MPI world: ``MPI_Abort`` through
mpi4py, which every MPI launcher honours (under srun it travels through PMIx and slurmstepd sends
SIGKILL to every task at once). MPI is initialised for that when the rank failed before its
backend did; that init waits for the other ranks to reach theirs (a peer still building a large model
has not), so a watchdog process bounds it (``wait_s``): in an srun step it runs
``scancel --signal=KILL JOB.STEP``, which needs no MPI at all, then it kills the rank.

Torch-free: the script-mode sitecustomize uses it in the user's interpreter.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Mapping, Optional

from . import env as envvars
from .lifeline import parent_death_signal
from .topology import Topology

ABORT_WAIT_S = 5.0  # at most this long for MPI_Init before the srun step is cancelled instead
CANCEL_NOTE = "[lmsdp] MPI_Abort did not end the job: cancelling step "


def ends_job_on_failure(topology: Optional[Topology], env: Optional[Mapping[str, str]] = None) -> bool:
    """True for a rank of several in an MPI world or an srun step that lmsrun's own mpirun did not
    start. torchrun is left alone: its agent tears the workers down itself (and may restart them)."""
    return (topology is not None and topology.size > 1 and (topology.mpi_world or topology.source == "slurm")
            and not envvars.flag(envvars.LAUNCHED, env))


def mpi_initialised() -> bool:
    """MPI is up in this process through mpi4py (already imported), not yet finalised."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        return bool(mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized())
    except Exception:  # noqa: BLE001 - a broken MPI module: treat as none
        return False


def abort_world(code: int, mpi_world: bool, wait_s: float = ABORT_WAIT_S) -> None:
    """End every rank of this job; returns only when nothing could (the caller then exits).

    The caller has printed and flushed its error line: MPI_Abort's own banner comes after it."""
    _flush()
    if mpi_world or mpi_initialised():
        # MPI_Init inside mpi4py's import holds the GIL while it waits for the other ranks, so no
        # thread of this process could time it out: a child process does.
        watchdog = _start_watchdog(wait_s)
        _mpi_abort(code)  # does not return when it works
        if watchdog is not None:
            watchdog.kill()
    cancel_slurm_step()


_WATCHDOG = """
import os, signal, subprocess, sys, time
wait_s, pid, step, scancel, note = sys.argv[1:]
time.sleep(float(wait_s))
if step and scancel:
    print(note + step, file=sys.stderr, flush=True)
    subprocess.run([scancel, "--signal=KILL", step], check=False)
os.kill(int(pid), signal.SIGKILL)
"""


def _start_watchdog(wait_s: float) -> Optional[subprocess.Popen]:
    """A child that, unless this process is gone first (it dies with it: PR_SET_PDEATHSIG), cancels
    this srun step after ``wait_s`` and then kills this process (its launcher then ends the job).
    One process (a ``sleep`` of its own would outlive it and hold the step open), started with
    ``-I -S``: fast, and without the script-mode sitecustomize."""
    step, scancel = slurm_step(), shutil.which("scancel")
    argv = [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(wait_s), str(os.getpid()), step or "", scancel or "",
            CANCEL_NOTE]
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=lambda: parent_death_signal(signal.SIGKILL))
    except OSError:
        return None


def abort_if_mpi_initialised(code: int) -> None:
    """MPI_Abort when MPI is already up (a script that used mpi4py); nothing otherwise."""
    if mpi_initialised():
        _flush()
        _mpi_abort(code)


def _mpi_abort(code: int) -> None:
    try:
        from mpi4py import MPI  # initialises MPI when Horovod or nothing did yet (collective: waits for peers)

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    except Exception as exc:  # noqa: BLE001 - report, the caller falls back to scancel / exit
        print(f"[lmsdp] MPI_Abort failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def slurm_step(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``JOBID.STEPID`` of the srun step this process is a task of (what scancel takes), else None."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "").strip()
    step = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    return f"{job}.{step}" if job.isdigit() and step.isdigit() else None


def cancel_slurm_step() -> bool:
    """SIGKILL every task of this srun step (no TERM: that would read as a stop request)."""
    step, scancel = slurm_step(), shutil.which("scancel")
    if step is None or scancel is None:
        return False
    print(f"{CANCEL_NOTE}{step}", file=sys.stderr, flush=True)
    try:
        return subprocess.run([scancel, "--signal=KILL", step], timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
