"""Failures travel as files, not as words in someone else's stdout (torchelastic's ``@record`` /
``ChildFailedError``): a failing rank writes ``rank<R>.json`` into the job's error folder
(``LMSDP_ERROR_DIR``, set by lmsrun), and lmsrun reports the earliest one. A rank whose stdout is
closed, flooded or cut off by mpirun is still reported with its own exception.

The folder (``/tmp/lmsdp-errors-*``) is private to one lmsrun and holds an ``owner`` file: that
lmsrun's pid and start time (``runtime.lifeline.Launcher``). lmsrun removes it at the end; one that
was killed (kill -9) cannot, so each lmsrun first removes the folders whose owner is gone. A failed
job's records are copied into the run's output folder first (``keep_errors``), since a surviving
rank's traceback (a consequence, printed as one line) exists nowhere else.

On another host the folder is not there (lmsrun made it in its own ``/tmp``): the rank then carries
its record over its output instead, as one ``CARRIED_PREFIX`` line on stderr that lmsrun's output
reader turns back into ``rank<R>.json`` in the folder, so the contract is the same on every host.

Names here are predictable (``rank<R>.json.<pid>.tmp``, ``<output_dir>/errors``) and the run folder
may be shared: files are created new with the user's umask, never through a planted link
(runtime/new_file.py), and a link planted at ``errors`` is removed, not written through."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import List, Optional
from lmsdp.runtime import run_folder

from . import env as envvars
from .lifeline import Launcher
from .new_file import open_new

ERROR_DIR_PREFIX = "lmsdp-errors-"
OWNER_FILE = "owner"  # "pid:start_time@host" of the lmsrun that made the folder
CARRIED_PREFIX = "[lmsdp] error record: "  # + one line of JSON, from a rank that cannot see the folder
KEPT_SUBDIR = run_folder.ERRORS  # <output_dir>/errors/rank<R>.json after a failed job


@dataclass
class ErrorRecord:
    """What one rank left behind when it failed."""

    rank: int
    type: str
    message: str
    traceback: str
    time: float          # time.time() when it was written
    host: str = ""
    pid: int = 0
    user_error: bool = False  # bad input the user can fix: shown as one 'lmsrun: error:' line

    @property
    def reason(self) -> str:
        """``Type: first line of the message`` (or the type alone)."""
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.type}: {first}" if first else self.type


def error_dir() -> Optional[str]:
    return envvars.read(envvars.ERROR_DIR) or None


def write_error(exc: BaseException, rank: int, directory: Optional[str] = None, user_error: bool = False) -> Optional[str]:
    """Write ``rank<R>.json`` for ``exc`` (atomically: temp file, rename); the first failure of a rank
    wins. Returns the path, or None when there is no error folder or it cannot be written (the
    failure is then still reported through the rank's output)."""
    directory = directory or error_dir()
    if not directory:
        return None
    record = ErrorRecord(rank=rank, type=type(exc).__name__, message=str(exc),
                         traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                         time=time.time(), host=socket.gethostname(), pid=os.getpid(), user_error=user_error)
    if not os.path.isdir(directory):
        if envvars.flag(envvars.LAUNCHED):  # lmsrun made the folder on its own host: carry the record to it
            try:
                sys.stderr.write(CARRIED_PREFIX + json.dumps(asdict(record)) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            return None
        try:  # no lmsrun to carry it to (srun, a user's mpirun): the folder is the job's, e.g. <output_dir>/errors
            os.makedirs(directory, exist_ok=True)
        except OSError:
            return None
    return save_record(record, directory)


def save_record(record: ErrorRecord, directory: str) -> Optional[str]:
    """``rank<R>.json`` for ``record`` in ``directory``, atomically (temp file, rename); the first
    failure of a rank wins. Returns the path, or None when it cannot be written."""
    path = os.path.join(directory, f"rank{record.rank}.json")
    if os.path.exists(path) and not os.path.islink(path):
        return path
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open_new(tmp) as handle:
            json.dump(asdict(record), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def carried_record(line: str) -> Optional[ErrorRecord]:
    """The record in a ``CARRIED_PREFIX`` line of a rank's output, else None."""
    if not line.startswith(CARRIED_PREFIX):
        return None
    try:
        return ErrorRecord(**json.loads(line[len(CARRIED_PREFIX):]))
    except (ValueError, TypeError):
        return None


def read_errors(directory: Optional[str]) -> List[ErrorRecord]:
    """Every readable ``rank<R>.json`` in ``directory``, earliest first (unreadable files are skipped)."""
    if not directory or not os.path.isdir(directory):
        return []
    records = []
    for name in os.listdir(directory):
        if not (name.startswith("rank") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                data = json.load(handle)
            records.append(ErrorRecord(**data))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(records, key=lambda r: (r.time, r.rank))


def make_error_dir(owner: Launcher, parent: Optional[str] = None) -> str:
    """A new private error folder with ``owner`` recorded in it (written before any rank starts)."""
    directory = tempfile.mkdtemp(prefix=ERROR_DIR_PREFIX, dir=parent)
    tmp = os.path.join(directory, f".{OWNER_FILE}.tmp")
    with open_new(tmp) as handle:
        handle.write(owner.encode())
    os.replace(tmp, os.path.join(directory, OWNER_FILE))
    return directory


def remove_stale_error_dirs(parent: Optional[str] = None) -> List[str]:
    """Remove this user's error folders whose owner lmsrun is gone (killed before its own clean-up);
    returns their paths. A folder is left alone when its owner is alive, on another host, or not
    recorded (an older lmsrun's folder, or one whose owner file is being written right now)."""
    parent = parent or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(parent) if n.startswith(ERROR_DIR_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        owner = _owner(path)
        if owner is None or not owner.local() or owner.alive():
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


def _owner(path: str) -> Optional[Launcher]:
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None  # a link, a file, or another user's folder: never ours to remove
        with open(os.path.join(path, OWNER_FILE), encoding="utf-8") as handle:
            return Launcher.decode(handle.read().strip())
    except OSError:
        return None


def keep_errors(records: List[ErrorRecord], output_dir: str) -> Optional[str]:
    """Write ``records`` as ``<output_dir>/errors/rank<R>.json`` (replacing an earlier failure's);
    returns that folder, or None when it cannot be written."""
    folder = os.path.join(output_dir, KEPT_SUBDIR)
    try:
        if os.path.islink(folder) or os.path.isfile(folder):
            os.unlink(folder)  # the link goes, never what it points at
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(output_dir, exist_ok=True)
        os.mkdir(folder)  # fails on a name re-planted in between: nothing is written then
        for record in records:
            with open_new(os.path.join(folder, f"rank{record.rank}.json")) as handle:
                json.dump(asdict(record), handle, indent=1)
    except OSError:
        return None
    return folder
