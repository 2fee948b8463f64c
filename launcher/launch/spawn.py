"""Run a built ``mpirun`` command to its end: signal forwarding, cleanup of every process of the job,
and a report naming the rank that failed.

How it works
- mpirun starts in its own session, so a terminal's Ctrl-C reaches only lmsrun, which decides what
  the ranks get. lmsrun makes itself a child subreaper, so ranks orphaned by a dying mpirun are
  still its descendants and are killed at the end: no process of the job outlives lmsrun.
- Output goes through ``launcher.demux.Demux`` (whole lines, rank prefixes, per-rank logs, last lines per
  rank); on a terminal a partial line quiet for 200 ms is shown as it is (a prompt, a progress line).
- Failure: Open MPI aborts the whole job as soon as one rank exits non-zero or dies by a signal.
  A failing rank writes ``rank<R>.json`` into ``job.error_dir`` (``lmsdp.runtime.error_file``);
  lmsrun reports the earliest. Only deaths by signal, which leave no file, are read from Open MPI's
  words; a rank's ``[lmsdp] rank R failed`` line remains the fallback (ranks on other hosts).
  A failed job's records (every rank's traceback, also the ones a surviving rank kept off its output)
  are kept as ``<output_dir>/errors/rank<R>.json`` and the report says so; the temporary folder goes,
  and each lmsrun first removes the folders that killed lmsruns left behind.
- Signals: the first SIGINT/SIGTERM becomes SIGUSR1 to mpirun (config mode), which forwards it to
  every rank; the worker treats it as "stop after this step, checkpoint, exit 0". In script mode the
  signal itself is passed to mpirun (user scripts know SIGTERM/SIGINT, not SIGUSR1). A second
  signal, or ``stop_timeout`` seconds without an exit, ends the job hard. Exit code: 128+signal.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from lmsdp.runtime import env as envvars
from lmsdp.runtime.errors import UserError
from lmsdp.runtime.signals import LAUNCHER_STOP_SIGNALS, SignalHandlers
from lmsdp.runtime.error_file import (ErrorRecord, keep_errors, make_error_dir, read_errors,
                                      remove_stale_error_dirs, save_record)
from lmsdp.runtime.shared_folder import mark_launcher

from .mpi_command import LOCAL_NAMES
from lmsdp.runtime.lifeline import Launcher, parent_death_signal

from .demux import Demux

# SIGHUP is what a dropped SSH session sends: treated like SIGTERM (checkpoint, then stop).
MPIRUN_UNKNOWN_OPTION = re.compile(r"(?:Error: unknown option|unrecognized argument) \"?([^\"\s]+)")
OMPI_FIRST = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]")
OMPI_EXIT = re.compile(r"Exit code:\s+(\d+)")
OMPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)")


FAILED_RANK_GRACE_S = 10.0  # after a rank's failure, how long mpirun may take to end the job itself


@dataclass
class Job:
    """A command to run and how to treat it."""

    command: List[str]
    env: Dict[str, str]
    flavor: str = "openmpi"
    output_dir: Optional[str] = None
    graceful_signal: Optional[int] = signal.SIGUSR1  # None: forward SIGINT/SIGTERM as they are
    stop_timeout: float = 120.0
    verbose: bool = False
    np: int = 0  # ranks, so each gets its rank<R>.log even when it prints nothing
    error_dir: Optional[str] = None  # where failing ranks write rank<R>.json (LMSDP_ERROR_DIR)
    keep_errors_in: Optional[str] = None  # the run's output folder: a failed job's records go to <it>/errors/
    rank_hosts: Dict[int, str] = field(default_factory=dict)  # rank -> host, when the launch plan says


@dataclass
class Failure:
    rank: Optional[int] = None
    reason: str = ""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    host: str = ""


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned ranks re-parent to lmsrun, so cleanup can find them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Runner:
    """Runs one Job to its end and returns lmsrun's exit code."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.signals: List[int] = []
        self.proc: Optional[subprocess.Popen] = None
        self.hard_deadline: Optional[float] = None
        self.kill_deadline: Optional[float] = None
        self.seen: Dict[int, object] = {}
        self.outcome = ""  # after a failed run: why, in one line (for callers that run many jobs)
        self.stopped_for_failure = False  # lmsrun stopped mpirun itself after a rank failed

    def run(self) -> int:
        """Run the job to its end. Its ranks get lmsrun as their lifeline (``LMSDP_LAUNCHER``) and, unless
        the job names one, a private error folder (``LMSDP_ERROR_DIR``) removed afterwards."""
        launcher = Launcher.this_process()
        env = {**self.job.env, envvars.LAUNCHER: launcher.encode()}
        if self.job.keep_errors_in:  # so rank 0 can tell whether this host sees the files it writes
            mark_launcher(self.job.keep_errors_in, launcher.encode())
        if self.job.error_dir is not None:
            self.job = dataclasses.replace(self.job, env=env)
            return self._run()
        remove_stale_error_dirs()
        error_dir = make_error_dir(launcher)
        try:
            self.job = dataclasses.replace(self.job, error_dir=error_dir, env={**env, envvars.ERROR_DIR: error_dir})
            return self._run()
        finally:
            shutil.rmtree(error_dir, ignore_errors=True)

    def _run(self) -> int:
        job = self.job
        become_subreaper()
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
        err = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else sys.stderr
        sys.stdout.flush()
        sys.stderr.flush()
        live = [name for name, sink in (("stdout", out), ("stderr", err)) if _isatty(sink)]
        demux = Demux(job.flavor, job.output_dir, out, err, verbose=job.verbose, live=live)
        for rank in range(job.np if job.output_dir else 0):
            demux.rank_log(rank)
        handlers = SignalHandlers(LAUNCHER_STOP_SIGNALS, self._on_signal).install()
        try:
            try:
                self.proc = subprocess.Popen(job.command, env=job.env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             start_new_session=True, preexec_fn=parent_death_signal)
            except OSError as exc:
                raise UserError(f"cannot start {job.command[0]}: {exc.strerror}") from None
            readers = [demux.reader(self.proc.stdout, "stdout"), demux.reader(self.proc.stderr, "stderr")]
            self._wait(demux)
            self._cleanup()
            for thread in readers:
                thread.join(timeout=3)
            demux.flush_partials()
        finally:
            handlers.restore()
            demux.close()
        return self._report(demux, self.proc.returncode)

    # ---- signals and waiting

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if len(self.signals) == 1 and self.job.graceful_signal is not None:
            _say(f"lmsrun: {signal.Signals(signum).name}: asking every rank to stop after this step "
                 "(again to stop now)")
            self._send(self.job.graceful_signal)
            self.hard_deadline = time.monotonic() + self.job.stop_timeout
        elif len(self.signals) == 1:  # script mode: user scripts know SIGTERM/SIGINT, not SIGHUP
            self._send(signal.SIGTERM if signum == signal.SIGHUP else signum)
            self.kill_deadline = time.monotonic() + 10
        else:
            self._send(signal.SIGTERM)
            self.kill_deadline = time.monotonic() + 3

    def _send(self, signum: int) -> None:
        try:
            assert self.proc is not None
            self.proc.send_signal(signum)
        except (ProcessLookupError, OSError):
            pass

    def _wait(self, demux: Demux) -> None:
        assert self.proc is not None
        failed_at: Optional[float] = None
        while True:
            try:
                self.proc.wait(timeout=0.2)
                return
            except subprocess.TimeoutExpired:
                pass
            self._snapshot()
            now = time.monotonic()
            if failed_at is None and (demux.marks or demux.carried):
                failed_at = now
            elif failed_at is not None and now - failed_at > FAILED_RANK_GRACE_S:
                # a rank failed and mpirun still waits: its daemon on an unreachable host cannot confirm
                _say(f"lmsrun: a rank failed {FAILED_RANK_GRACE_S:g} s ago and mpirun has not ended the job "
                     "(a host unreachable?); stopping it")
                self.stopped_for_failure = True
                self._send(signal.SIGTERM)
                self.kill_deadline = now + 3
                failed_at = float("inf")  # once
            if self.hard_deadline is not None and now > self.hard_deadline:
                print("lmsrun: ranks did not stop in time; terminating the job", file=sys.stderr, flush=True)
                self.hard_deadline = None
                self._send(signal.SIGTERM)
                self.kill_deadline = now + 5
            if self.kill_deadline is not None and now > self.kill_deadline:
                self.kill_deadline = None
                self._kill_all()

    def _snapshot(self) -> None:
        """Remember the job's processes, for cleanup even if the subreaper flag was refused."""
        try:
            import psutil

            for child in psutil.Process(self.proc.pid).children(recursive=True):  # type: ignore[union-attr]
                self.seen.setdefault(child.pid, child)
        except Exception:  # noqa: BLE001 - best effort: the process may be gone already
            pass

    def _kill_all(self) -> None:
        try:
            import psutil

            procs = list(psutil.Process().children(recursive=True))
            procs += [p for p in self.seen.values() if p not in procs]  # type: ignore[operator]
            for proc in procs:
                try:
                    if proc.is_running():  # type: ignore[attr-defined]
                        proc.kill()  # type: ignore[attr-defined]
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=3)  # type: ignore[arg-type]
        except ImportError:
            if self.proc is not None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass

    def _cleanup(self) -> None:
        """mpirun has exited: anything of the job still alive (orphans) is killed and reaped."""
        self._kill_all()

    # ---- the verdict

    def _report(self, demux: Demux, returncode: Optional[int]) -> int:
        own = "\n".join(demux.own)
        if self.job.error_dir is not None:  # records carried over the output become files, like the others
            for record in demux.carried:
                save_record(record, self.job.error_dir)
        records = read_errors(self.job.error_dir)
        failure = self._failure(demux, own, records)
        if self.signals:
            return 128 + self.signals[0]
        if returncode == 0:
            if demux.own and not self.job.verbose:
                print(own, file=sys.stderr)
            return 0
        if demux.user_errors:
            for line in demux.user_errors:
                if line not in demux.user_errors_shown:
                    print(line, file=sys.stderr)
            return 2
        user_errors = [r for r in records if r.user_error]
        if user_errors and not failure.signal:  # a rank's output was lost, its error file was not
            print(f"lmsrun: error: {user_errors[0].message}", file=sys.stderr)
            return 2
        code = returncode if returncode and returncode > 0 else 128 + (-(returncode or 0)) if returncode else 1
        if self.stopped_for_failure:
            code = 1  # mpirun's own death on lmsrun's SIGTERM (Open MPI may crash) is not the job's verdict
        kept = self._keep(records)
        # mpirun itself killed by a signal is the cause: what its ranks wrote after losing it (a broken
        # pipe, a dead peer) is a consequence, even when it reached an error file first
        if returncode is not None and returncode < 0 and self.proc is not None and not self.stopped_for_failure:
            self.outcome = (f"{os.path.basename(self.job.command[0])} was killed by signal {-returncode} "
                            f"({_signame(-returncode)})")
            print(f"lmsrun: {os.path.basename(self.job.command[0])} (pid {self.proc.pid}) was killed by signal "
                  f"{-returncode} ({_signame(-returncode)}); stopped all {self.job.np or len(demux.tails)} ranks; "
                  f"exit code {code}", file=sys.stderr, flush=True)
            _say(kept)
            return code
        rejected = MPIRUN_UNKNOWN_OPTION.search(own)
        if failure.rank is None and rejected:
            print(f"lmsrun: error: --mpi-args: {os.path.basename(self.job.command[0])} does not know the option "
                  f"{rejected.group(1)}; allowed: the options of '{self.job.command[0]} --help'",
                  file=sys.stderr, flush=True)
            return 2
        if failure.rank is None:
            if demux.own and not self.job.verbose:
                print(own, file=sys.stderr)
            _say(kept)
            print(f"lmsrun: the job failed (exit code {code})", file=sys.stderr, flush=True)
            return code
        if failure.signal:
            name = _signame(failure.signal)
            what = f"was killed by signal {failure.signal} ({name})"
        elif failure.reason:
            what = f"failed: {failure.reason}"
        else:
            what = f"exited with code {failure.exit_code}"
        host = failure.host or self.job.rank_hosts.get(failure.rank, "")
        if host in LOCAL_NAMES or host == socket.gethostname():
            host = ""  # a rank on lmsrun's own host needs no host name
        self.outcome = f"rank {failure.rank}{f' on host {host}' if host else ''} {what}"
        lines = [f"lmsrun: {self.outcome}"]
        tail = list(demux.tails.get(failure.rank, []))
        if tail:
            lines.append(f"lmsrun: last lines of rank {failure.rank}:")
            lines += [f"  | {line}" for line in tail[-10:]]
        silent = self._silent_hosts(demux, records) if self.stopped_for_failure else []
        if silent:
            lines.append(f"lmsrun: no word from host {', '.join(silent)} after the failure: unreachable?")
        if kept:
            lines.append(kept)
        lines.append(f"lmsrun: stopped all {self.job.np or len(demux.tails)} ranks; exit code {code}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        return code

    def _silent_hosts(self, demux: Demux, records: Sequence[ErrorRecord]) -> List[str]:
        """Hosts none of whose ranks reported a failure, when mpirun had to be stopped: a host that
        cannot be reached says nothing (its ranks' errors cannot travel)."""
        spoke = {r.rank for r in records} | {rank for rank, _ in demux.marks}
        hosts: Dict[str, List[int]] = {}
        for rank, host in self.job.rank_hosts.items():
            hosts.setdefault(host, []).append(rank)
        return [f"{host} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
                for host, ranks in hosts.items() if not spoke.intersection(ranks)]

    def _keep(self, records: Sequence[ErrorRecord]) -> str:
        """Copy a failed job's error records into the run's output folder (the temporary folder is
        removed at the end); returns the report line that says where, or ''."""
        if not records or not self.job.keep_errors_in:
            return ""
        folder = keep_errors(list(records), self.job.keep_errors_in)
        if folder is None:
            return ""
        names = ", ".join(f"rank{r.rank}.json" for r in sorted(records, key=lambda r: r.rank))
        return f"lmsrun: each failed rank's traceback is kept in {folder}{os.sep}: {names}"

    @staticmethod
    def _failure(demux: Demux, own: str, records: Sequence[ErrorRecord] = ()) -> Failure:
        """Which rank failed first and why: a death by signal leaves no error file, so Open MPI's
        words name it; otherwise the earliest error file; otherwise Open MPI's first non-zero exit
        and the rank's own ``[lmsdp] rank R failed`` line."""
        failure = Failure()
        first = OMPI_FIRST.search(own)
        killed = OMPI_SIGNAL.search(own)
        if killed and not first:
            failure.rank, failure.host, failure.signal = int(killed.group(1)), killed.group(2), int(killed.group(3))
            return failure
        if records:
            earliest = records[0]
            failure.rank, failure.reason, failure.host = earliest.rank, earliest.reason, earliest.host
            if first and int(first.group(1)) == earliest.rank:
                code = OMPI_EXIT.search(own, first.end())
                failure.exit_code = int(code.group(1)) if code else None
            return failure
        if first:
            failure.rank = int(first.group(1))
            code = OMPI_EXIT.search(own, first.end())
            failure.exit_code = int(code.group(1)) if code else None
        marks = dict(reversed(demux.marks))  # the first mark per rank wins
        if failure.rank is None and demux.marks:
            failure.rank = demux.marks[0][0]
        if failure.rank is not None and failure.rank in marks:
            failure.reason = marks[failure.rank]
        return failure


def _say(line: str) -> None:
    """A line on stderr that never raises (after SIGHUP the terminal may be gone); '' prints nothing."""
    if not line:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def run_job(job: Job) -> int:
    """Run ``job``; returns lmsrun's exit code (the failed rank's code, or 128+signal)."""
    return Runner(job).run()
