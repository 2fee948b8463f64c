"""Is a folder the same folder on every host of a job? Asked, not assumed: a token file.

Rank 0 writes a fresh token into the folder; every rank looks for it and the answers are gathered
(``allgather``: any backend's ``allgather_object``), so every rank knows the same thing. lmsrun also
leaves its own mark (``LAUNCHER_MARK``, its ``LMSDP_LAUNCHER`` value) in the run's output folder
before the ranks start: rank 0 seeing it means lmsrun's host sees the files rank 0 writes. Torch-free:
the launcher writes its mark, a rank runs the check.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from .run_folder import LAUNCHER_MARK, SHARED_TOKEN as TOKEN_FILE


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _holds(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read() == text
    except OSError:
        return False


def mark_launcher(folder: str, launcher: str) -> None:
    """lmsrun's mark in the run's output folder (best effort: a folder it cannot write is the ranks' problem)."""
    try:
        os.makedirs(folder, exist_ok=True)
        _write(os.path.join(folder, LAUNCHER_MARK), launcher)
    except OSError:
        pass


@dataclass
class FolderView:
    """What the ranks found: which hosts see rank 0's files in ``path``."""

    path: str
    main_host: str
    blind_hosts: List[str] = field(default_factory=list)  # hosts of ranks that do not see rank 0's token
    launcher_host: Optional[str] = None  # lmsrun's host, when it does not see rank 0's files

    @property
    def shared(self) -> bool:
        return not self.blind_hosts and self.launcher_host is None

    def where(self) -> str:
        """'not seen from host h2, lmsrun's host login' (for messages)."""
        parts = [f"host {h}" for h in self.blind_hosts]
        if self.launcher_host is not None:
            parts.append(f"lmsrun's host {self.launcher_host}")
        return ", ".join(parts)


def check_folder(path: str, rank: int, allgather: Callable[[Any], List[Any]],
                 launcher: Optional[str] = None) -> FolderView:
    """Every rank calls this at the same point; ``launcher`` is ``LMSDP_LAUNCHER`` (PID:START@HOST)."""
    host = socket.gethostname()
    token = None
    if rank == 0:
        token = uuid.uuid4().hex
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, TOKEN_FILE), token)
    token = allgather(token)[0]
    launcher_seen = rank != 0 or not launcher or _holds(os.path.join(path, LAUNCHER_MARK), launcher)
    views: List[Tuple[str, bool, bool]] = allgather((host, _holds(os.path.join(path, TOKEN_FILE), token),
                                                     launcher_seen))
    main_host = views[0][0]
    blind: List[str] = []
    for other, seen, _ in views:
        if not seen and other not in blind:
            blind.append(other)
    launcher_host = None
    if not views[0][2] and launcher:
        launcher_host = launcher.rpartition("@")[2] or "?"
        if launcher_host == main_host:
            launcher_host = None  # same host name, another /tmp (a container): still one host's view
    return FolderView(path, main_host, blind, launcher_host)
