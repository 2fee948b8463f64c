"""Failures travel as files, not as words in someone else's stdout (torchelastic's ``@record`` /
``ChildFailedError``): a failing rank writes ``rank<R>.json`` into the job's error folder
(``LMSDP_ERROR_DIR``, set by lmsrun), and lmsrun reports the earliest one. A rank whose stdout is
closed, flooded or cut off by mpirun is still reported with its own exception."""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from typing import List, Optional

from . import env as envvars


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
    path = os.path.join(directory, f"rank{rank}.json")
    if os.path.exists(path):
        return path
    record = ErrorRecord(rank=rank, type=type(exc).__name__, message=str(exc),
                         traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                         time=time.time(), host=socket.gethostname(), pid=os.getpid(), user_error=user_error)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(asdict(record), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        return None
    return path


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
