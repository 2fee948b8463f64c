"""The signals that stop a job, in one place, and one way to install handlers for a set of them and
put the previous ones back. torch-free: used by lmsrun (launch), each rank (train) and script mode."""
from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Sequence

# A rank finishes its step, checkpoints and exits 128+signal on any of these. SIGUSR1 is lmsrun's own
# graceful stop (sent to every rank on Ctrl-C); SIGHUP is a dropped SSH session.
RANK_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# lmsrun (and a launcher like it) turns these into a graceful stop of every rank.
LAUNCHER_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Handler = Callable[[int, Any], Any]


class SignalHandlers:
    """``handler`` for each of ``signals`` while installed; ``restore()`` puts the previous ones back."""

    def __init__(self, signals: Sequence[int], handler: Handler) -> None:
        self.signals, self.handler = tuple(signals), handler
        self.previous: Dict[int, Any] = {}

    def install(self) -> "SignalHandlers":
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.signals}
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> "SignalHandlers":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
