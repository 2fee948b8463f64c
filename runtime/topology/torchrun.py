"""torchrun / torch.distributed.run workers (torch's env:// contract)."""
from __future__ import annotations

import os
from typing import Optional

from .base import Environment, first_int, read_int
from .model import Env, Topology


class TorchrunEnvironment(Environment):
    """torchrun / torch.distributed.run (or any env:// launch): RANK, WORLD_SIZE, and optionally
    LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT."""

    name = "torchrun"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if not all(k in env for k in ("RANK", "WORLD_SIZE")):
            return None  # torch's env:// contract; LOCAL_RANK is optional there (default: one host)
        rank = read_int(env, "RANK", cls.name)
        size = read_int(env, "WORLD_SIZE", cls.name)
        local_rank = first_int(env, ["LOCAL_RANK"], cls.name)
        local_size = first_int(env, ["LOCAL_WORLD_SIZE"], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        node = first_int(env, ["GROUP_RANK"], cls.name)
        node = rank // max(1, local_size) if node is None else node
        port = first_int(env, ["MASTER_PORT"], cls.name)
        return Topology(rank, local_rank, size, local_size, node, cls.name,
                        main_address=env.get("MASTER_ADDR", "127.0.0.1") if port is not None else None,
                        main_port=port)
