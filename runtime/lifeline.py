"""Ranks die with their launcher: no headless job keeps training after ``lmsrun`` is gone.

Two mechanisms, because neither covers every case alone:
- ``parent_death_signal``: ``PR_SET_PDEATHSIG`` in mpirun's pre-exec, so the kernel signals mpirun
  when lmsrun dies (kill -9, a dropped SSH session). It covers mpirun only: its own children (the
  ranks) are not signalled, and a killed mpirun cannot forward anything.
- ``watch_launcher``: every rank started on lmsrun's host checks, twice a second, that lmsrun's
  process (pid and start time from ``LMSDP_LAUNCHER``, so a reused pid is not mistaken for it) is
  still there, and ends the rank at once when it is not. mpirun does not pass file descriptors
  through to the ranks, so a pid watch, not a pipe, is what reaches them. Ranks on other hosts
  cannot see lmsrun's pid; mpirun's own daemons end them when mpirun goes.

Torch-free: the script-mode sitecustomize starts the same watch in the user's interpreter.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from . import env as envvars

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (a pre-exec hook;
    best effort: a system without prctl keeps the rank-side watch only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


def start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when
    there is no such process or it has exited (a zombie waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()  # after "(comm)": field 3 (state) onwards
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass(frozen=True)
class Launcher:
    """Who started this rank: host, pid and start time of the lmsrun process."""

    host: str
    pid: int
    started: str

    def encode(self) -> str:
        return f"{self.pid}:{self.started}@{self.host}"

    @classmethod
    def this_process(cls) -> "Launcher":
        return cls(socket.gethostname(), os.getpid(), start_time(os.getpid()) or "0")

    @classmethod
    def decode(cls, text: str) -> Optional["Launcher"]:
        ident, _, host = text.partition("@")
        pid, _, started = ident.partition(":")
        if not (host and pid.isdigit() and started):
            return None
        return cls(host, int(pid), started)

    def alive(self) -> bool:
        """True while the process is there (a pid reused by another process counts as gone)."""
        return start_time(self.pid) == self.started

    def local(self) -> bool:
        return self.host == socket.gethostname()


def launcher_from_env() -> Optional[Launcher]:
    text = envvars.read(envvars.LAUNCHER)
    return Launcher.decode(text) if text else None


def on_launcher_lost_default(launcher: Launcher) -> None:
    """End this rank now: no checkpoint (the job has nobody left to report to, and a new job may
    already be resuming from the same folder)."""
    try:
        sys.stderr.write(f"[lmsdp] lmsrun (pid {launcher.pid}) is gone; stopping this rank\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(128 + signal.SIGHUP)


def watch_launcher(on_lost: Callable[[Launcher], None] = on_launcher_lost_default,
                   poll_s: float = POLL_S) -> Optional[threading.Thread]:
    """Start the watch when ``LMSDP_LAUNCHER`` names a process on this host; returns the thread."""
    launcher = launcher_from_env()
    if launcher is None or not launcher.local() or launcher.pid == os.getpid():
        return None
    if not launcher.alive():
        on_lost(launcher)
        return None

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if not launcher.alive():
                on_lost(launcher)
                return

    thread = threading.Thread(target=watch, name="lmsdp-launcher-watch", daemon=True)
    thread.start()
    return thread
