"""The base of the launch environments (Lightning's ``ClusterEnvironment``) and its variable readers."""
from __future__ import annotations

import os
from typing import List, Optional

from ..errors import TopologyError
from .model import Env, Topology


def read_int(env: Env, name: str, source: str) -> int:
    """``env[name]`` as an integer; anything else is a TopologyError naming the variable."""
    value = env.get(name, "")
    try:
        return int(value.strip())
    except ValueError:
        raise TopologyError(f"{source}: {name}={value!r} is not an integer",
                            hint="the launcher's environment is broken; unset stray variables") from None


def first_int(env: Env, names: List[str], source: str) -> Optional[int]:
    """The first of ``names`` that is set, as an integer, else None."""
    for name in names:
        if env.get(name, "").strip():
            return read_int(env, name, source)
    return None


class Environment:
    """Base: ``detect(env)`` returns a Topology when this launcher started the process, else None."""

    name = "?"

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        raise NotImplementedError


class MPIVariables(Environment):
    """An MPI launcher that exports rank/size and (optionally) local rank/size under its own names.
    Neither Open MPI nor Hydra exports a node index; with by-slot mapping it is rank // local_size."""

    RANK, SIZE, LOCAL_RANK, LOCAL_SIZE = "", "", "", ""

    @classmethod
    def detect(cls, env: Optional[Env] = None) -> Optional[Topology]:
        env = os.environ if env is None else env
        if cls.RANK not in env or cls.SIZE not in env:
            return None
        rank = read_int(env, cls.RANK, cls.name)
        size = read_int(env, cls.SIZE, cls.name)
        local_rank = first_int(env, [cls.LOCAL_RANK], cls.name)
        local_size = first_int(env, [cls.LOCAL_SIZE], cls.name)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        return Topology(rank, local_rank, size, local_size, rank // max(1, local_size), cls.name, mpi_world=True)
