"""Files at predictable names in folders others may write (a group-writable checkpoint or run
folder): created new, never through a link someone planted there, with the user's umask.

``open(path, "w")`` follows a symbolic link at ``path``: another user who can write the folder could
point ``step-N.pt.sha256.tmp`` or ``rank0.json.<pid>.tmp`` at a file of yours and have lmsdp overwrite
it. ``O_EXCL | O_NOFOLLOW`` creates the file itself or fails; a leftover name is unlinked first
(``unlink`` removes a link, never what it points at)."""
from __future__ import annotations

import os
from typing import IO

CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(path: str) -> int:
    """A new file at ``path`` (mode 0666 less the umask), never through a link; returns its fd.
    Raises OSError when the name cannot be taken (e.g. someone re-planted it in between)."""
    try:
        return os.open(path, CREATE_NEW, 0o666)
    except FileExistsError:
        os.unlink(path)  # left by a killed writer, or planted: the name goes, not its target
        return os.open(path, CREATE_NEW, 0o666)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_new(path: str, binary: bool = False) -> IO:
    """``create_new`` as a file object (text: UTF-8)."""
    fd = create_new(path)
    return os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
