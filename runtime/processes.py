"""Is a process still there: one answer for every part that cleans up after a dead one (a failed
collective naming its dead peer, the disk tier removing a killed rank's spill folder)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """False when the process is gone or a zombie (exited, not yet reaped); True when it exists, even
    if it belongs to another user."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


__all__ = ["pid_alive"]
