"""Which training steps the traces record (``train.trace_steps`` / ``train.trace_every``), and the
window every producer of one rank consults: the swap engine's trace, the comm timeline, Horovod's own.

A trace of every step grows without end (tens of KB per step, in memory or on disk); a few steady
steps show everything the report draws. So, as torch.profiler's schedule and Horovod's dynamic
timeline do: record steps ``first..last``, and with ``every`` repeat a window of the same length
every ``every`` steps from ``first`` on. Torch-free: the producers live in swapping/ and comm/."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

DEFAULT_STEPS = (10, 14)


@dataclass(frozen=True)
class TraceSchedule:
    """Steps ``first``..``last`` (inclusive) are traced; ``every`` > 0 repeats that window every
    ``every`` steps (a window starts at first, first + every, first + 2 * every, ...)."""

    first: int = DEFAULT_STEPS[0]
    last: int = DEFAULT_STEPS[1]
    every: int = 0

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def active(self, step: int) -> bool:
        """True when ``step`` (1-based training step) is recorded."""
        if step < self.first:
            return False
        offset = step - self.first
        if self.every > 0:
            offset %= self.every
        return offset < self.length

    def windows(self, up_to: int) -> List[Tuple[int, int]]:
        """The (first, last) step windows that start at or before step ``up_to``."""
        out: List[Tuple[int, int]] = []
        start = self.first
        while start <= up_to:
            out.append((start, start + self.length - 1))
            if self.every <= 0:
                break
            start += self.every
        return out

    def describe(self) -> str:
        """'steps 10-14' or 'steps 10-14, then 5 steps every 1000'."""
        text = f"steps {self.first}-{self.last}" if self.last > self.first else f"step {self.first}"
        return text + (f", then {self.length} every {self.every}" if self.every > 0 else "")


class TraceWindow:
    """The step running now and whether it is traced: set once per step by whoever counts steps (the
    training loop, or a script-mode engine), read by every trace producer of the rank."""

    def __init__(self, schedule: TraceSchedule = TraceSchedule()) -> None:
        self.schedule = schedule
        self.step = 0
        self.active = False

    def begin(self, step: int) -> bool:
        """Step ``step`` starts; returns whether it is traced."""
        self.step = step
        self.active = self.schedule.active(step)
        return self.active
