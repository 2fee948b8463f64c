"""One live job per checkpoint folder: ``<checkpoint_dir>/.lmsdp.lock``.

Rank 0 holds an exclusive ``flock`` on the file (Linux maps it to a POSIX lock on NFS) for the whole run
and writes its host, pid and start time into it. The kernel drops the lock when the holder dies,
however it dies, so a stale lock (kill -9, a crashed node's NFS lease) never blocks: the next job
takes it over and says so. A second job while the first is alive gets one line naming the holder.

The name is predictable and the folder may be shared: the file is opened without following a link
(``O_NOFOLLOW``) and must be a regular file (a planted FIFO would hang the open: ``O_NONBLOCK``),
else one line says so; it is created with the user's umask.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from lmsdp.runtime.lifeline import start_time

from lmsdp.launcher.config.errors import UserError

LOCK_NAME = ".lmsdp.lock"


class CheckpointInUse(UserError):
    """Another live job writes checkpoints into the same folder."""


class LockNotAFile(UserError):
    """Something other than a regular file (a planted link, a FIFO) sits at the lock's name."""


def _open_lock(path: str, flags: int) -> int:
    """Open the lock file at ``path`` never through a link, and only when it is a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd >= 0:
        os.close(fd)
    raise LockNotAFile(f"train.checkpoint_dir: {path} is not a regular file (a symbolic link or other "
                       "planted there?); lmsdp never writes through one",
                       hint="remove it if it is not yours, and check who else can write that folder")


def _holder_text(info: Dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0))) if info.get("since") else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, since {when}"


def _read_info(path: str) -> Dict[str, Any]:
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, UserError):
        return {}
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> Dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class CheckpointLock:
    """Exclusive use of a checkpoint folder by one job (taken by rank 0 before training)."""

    directory: str
    fd: Optional[int] = None
    path: str = ""

    def acquire(self, announce: bool = True) -> "CheckpointLock":
        """Take the lock or raise CheckpointInUse naming the live holder; a stale lock is taken over."""
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, LOCK_NAME)
        while True:
            fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise CheckpointInUse(
                    f"train.checkpoint_dir: {self.directory} is in use by a running job "
                    f"({_holder_text(_read_info(self.path))})",
                    hint="stop that job first, or give this one another train.checkpoint_dir / --output-dir") from None
            try:  # the file may have been removed by a holder releasing it between open and lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_fd(fd)  # through the held fd: never open+close the file while holding it
        if stale and announce:
            print(f"[lmsdp] note: {self.directory} was locked by a job that is gone ({_holder_text(stale)}); "
                  "taking it over", file=sys.stderr, flush=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": start_time(os.getpid()),
                "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file (a leftover file then means a holder that died) and drop the lock."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "CheckpointLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *_exc: Any) -> None:
        self.release()


def check_free(directory: str) -> None:
    """Raise CheckpointInUse when a live job holds ``directory`` (lmsrun's check before starting
    ranks; rank 0's ``acquire`` is the one that counts)."""
    path = os.path.join(directory, LOCK_NAME)
    if not os.path.lexists(path):
        return
    try:
        fd = _open_lock(path, os.O_RDWR)
    except OSError:
        return  # unreadable: rank 0's acquire reports it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise CheckpointInUse(
                f"train.checkpoint_dir: {directory} is in use by a running job ({_holder_text(_read_info(path))})",
                hint="stop that job first, or give this one another train.checkpoint_dir / --output-dir") from None
    finally:
        os.close(fd)  # closing drops a lock this probe may have taken
