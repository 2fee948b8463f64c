"""Who is gone when a collective fails: a dead local peer is named, so a CommError says which rank."""
from __future__ import annotations

import socket
import time
from typing import List, Optional, Tuple

from lmsdp.runtime.processes import pid_alive

from .base import CommError

EXIT_GRACE_S = 1.0  # how long a failed collective waits for a departing local peer to be gone


def dead_peers(rank: int, peers: List[Tuple[str, int]]) -> List[int]:
    """Ranks on this host whose process is gone; ``peers`` is (hostname, pid) per rank."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(peers) if r != rank and h == host and not pid_alive(pid)]


def peer_error(backend: str, what: str, exc: BaseException, rank: int, size: int,
               peers: List[Tuple[str, int]], timeout_s: float) -> CommError:
    """CommError naming the peer: dead local peers if any are found, else the only other rank of a
    2-rank job, else 'unknown' (a remote peer or a live but stuck one)."""
    dead = dead_peers(rank, peers) if peers else []
    deadline = time.monotonic() + EXIT_GRACE_S
    while peers and not dead and time.monotonic() < deadline:
        # the library can report a lost peer a moment before that process has finished exiting
        time.sleep(0.05)
        dead = dead_peers(rank, peers)
    peer: Optional[int] = None
    if dead:
        peer = dead[0]
        who = "peer rank " + ", ".join(str(r) for r in dead) + " (process gone)"
    elif size == 2:
        peer = 1 - rank
        who = f"peer rank {peer}"
    else:
        who = "peer rank unknown"
    text = str(exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    return CommError(f"{backend} backend: {what} with {who} failed/timed out "
                     f"(timeout {timeout_s:g} s, rank {rank}/{size}): {detail}",
                     backend=backend, peer=peer)
