"""No launcher: one process."""
from __future__ import annotations

from typing import Optional

from .base import Environment
from .model import Env, Topology


class SingleEnvironment(Environment):
    """No launcher: one process, rank 0 of 1."""

    name = "single"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        return Topology()
