"""The rank side of ``lmsrun``: what runs inside one rank once the front end (``launcher/cli/``)
has resolved the plan: the worker with early signals kept, failures written as error files
(``lmsdp.runtime.error_file``) and a loud, immediate exit that, under srun or a user's own mpirun,
takes the whole job down (``lmsdp.runtime.abort``); or, in script mode, the user's program."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

from lmsdp.runtime import env as envvars
from lmsdp.runtime.abort import abort_world, ends_job_on_failure
from lmsdp.runtime.error_file import write_error
from lmsdp.runtime.lifeline import watch_launcher
from lmsdp.runtime.signals import RANK_STOP_SIGNALS, SignalHandlers

from lmsdp.launcher.config.errors import UserError


def exec_program(program: List[str], env: Dict[str, str]) -> int:
    """Script mode inside an existing rank: replace this process with the user's command."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(program[0], program, env)
    except OSError as exc:
        raise UserError(f"cannot run {program[0]}: {exc.strerror}") from None
    return 0  # not reached


class EarlyStop:
    """A stop signal that arrives while the rank is still importing/building is not lost: it is
    recorded and sent again once the worker has installed its own handlers."""

    def __init__(self) -> None:
        self.pending: List[int] = []
        self.done = threading.Event()

    def install(self) -> None:
        SignalHandlers(RANK_STOP_SIGNALS, self._record).install()  # replaced, not restored: the worker's follow
        threading.Thread(target=self._watch, daemon=True, name="lmsdp-early-stop").start()

    def _record(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)

    def _watch(self) -> None:
        while not self.done.wait(0.05):
            if signal.getsignal(signal.SIGUSR1) != self._record:  # the worker's handler is in place
                for signum in self.pending:
                    os.kill(os.getpid(), signum)
                return


def run_rank(config: Any, topology: Any) -> int:
    """This process is one rank: run the worker; on an exception print it with the rank and exit
    non-zero at once (no atexit hooks that could wait in a collective for ranks that are gone)."""
    watch_launcher()  # lmsrun gone (kill -9, lost SSH session): this rank ends too
    early = EarlyStop()
    early.install()
    try:
        with failure_ends_rank(topology):
            from .trainer import run_worker

            code = run_worker(config, topology)
    finally:
        early.done.set()
    if code >= 128 and envvars.flag(envvars.LAUNCHED) and topology.size > 1:
        # A requested stop, checkpoint written: exit 0 so mpirun does not kill ranks still saving;
        # lmsrun itself returns 128+signal.
        return 0
    return code


@contextmanager
def failure_ends_rank(topology: Any) -> Iterator[None]:
    """The rank's error boundary: an exception inside writes this rank's error file, prints one line
    (a traceback too when the rank is the cause, not a consequence) and ends the rank at once; under
    a launcher other than lmsrun's own mpirun it ends the whole job too (``runtime.abort``)."""
    try:
        yield
    except UserError as exc:
        write_error(exc, topology.rank, user_error=True)
        _die(f"lmsrun: error: {exc}", exc.exit_code, topology)
    except BaseException as exc:  # noqa: BLE001 - any failure must end this rank, loudly
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        write_error(exc, topology.rank)
        if not _is_consequence(exc):
            traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
        _die(f"[lmsdp] rank {topology.rank} failed: {reason}", 130 if isinstance(exc, KeyboardInterrupt) else 1,
             topology)


def _is_consequence(exc: BaseException) -> bool:
    """A collective that failed because a peer died or hung: its traceback (25-60 lines of gloo or
    Horovod internals) says nothing about the cause and would bury lmsrun's report, so the rank
    prints its one ``failed`` line only (the traceback is in its error file)."""
    from lmsdp.comm.base import CommError

    return isinstance(exc, CommError)


def _die(line: str, code: int, topology: Any) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001
        pass
    print(line, file=sys.stderr, flush=True)
    if ends_job_on_failure(topology):  # srun, a user's own mpirun: nobody else ends the other ranks
        abort_world(code, topology.mpi_world)
    time.sleep(0.05)  # let the line reach mpirun before the job is torn down
    os._exit(code)
