"""The 2-D device mesh: ``comm.mesh: {dp: D, tp: T}`` (D x T = world size). Ranks are laid out
row-major over (dp, tp): rank r is at dp = r // T, tp = r % T, so the T ranks of one tensor-parallel
group are neighbours (one host, where the link is fastest) and ``comm.strategy`` reduces or shards
along ``dp`` only.

Parsing is pure (no process group): the planner and ``lmsrun``'s front end call ``parse_mesh`` and
``mesh_shapes``; ``MeshLayout.build`` makes the torch ``DeviceMesh`` over the torch backend's
process group once it exists.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Union

from lmsdp.runtime.errors import UserError

AUTO = "auto"
DIMS = ("dp", "tp")
KEY = "comm.mesh"


@dataclass(frozen=True)
class MeshShape:
    """How the ranks split: ``dp`` data-parallel groups of ``tp`` tensor-parallel ranks each."""

    dp: int
    tp: int

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @property
    def tensor_parallel(self) -> bool:
        return self.tp > 1

    def coords(self, rank: int) -> "tuple[int, int]":
        """(dp index, tp index) of global ``rank`` (row-major: tp varies fastest)."""
        return rank // self.tp, rank % self.tp

    def describe(self) -> str:
        return f"{{dp: {self.dp}, tp: {self.tp}}}"


MeshValue = Union[None, str, Mapping[str, Any], MeshShape]


def is_auto(value: MeshValue) -> bool:
    return isinstance(value, str) and value == AUTO


def parse_mesh(value: MeshValue, world: int, key: str = KEY) -> MeshShape:
    """``comm.mesh`` as a MeshShape for a job of ``world`` ranks; bad input is one UserError line.

    None means {dp: world, tp: 1} (data parallelism only, today's behaviour). ``auto`` means the
    same here: the layout planner resolves ``auto`` before calling this. A mapping may leave one
    dimension out (it is world / the other)."""
    if value is None or is_auto(value):
        return MeshShape(world, 1)
    if isinstance(value, MeshShape):
        shape = value
    elif isinstance(value, str):
        raise UserError(f"{key}: '{value}' is not allowed; allowed: auto or a mapping {{dp: D, tp: T}} "
                        f"with D x T = {world} ranks")
    elif isinstance(value, Mapping):
        for name in value:
            if name not in DIMS:
                close = difflib.get_close_matches(str(name), DIMS, n=1, cutoff=0.5)
                guess = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(f"{key}.{name}: unknown mesh dimension{guess}; allowed: dp, tp")
        sizes = {}
        for name in DIMS:
            if name in value and value[name] is not None:
                size = value[name]
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    raise UserError(f"{key}.{name}: expected a positive integer, got {size!r}")
                sizes[name] = size
        if not sizes:
            raise UserError(f"{key}: give dp, tp or both (D x T = {world} ranks)")
        for name, other in (("dp", "tp"), ("tp", "dp")):
            if name not in sizes:
                if world % sizes[other]:
                    raise UserError(f"{key}.{other}: {sizes[other]} does not divide the {world} ranks; "
                                    f"allowed: {', '.join(str(d) for d in divisors(world))}")
                sizes[name] = world // sizes[other]
        shape = MeshShape(sizes["dp"], sizes["tp"])
    else:
        raise UserError(f"{key}: expected auto or a mapping {{dp: D, tp: T}}, got {type(value).__name__}")
    if shape.world != world:
        options = ", ".join(s.describe() for s in mesh_shapes(world))
        raise UserError(f"{key}: dp x tp = {shape.dp} x {shape.tp} = {shape.world} but the job has {world} "
                        f"rank(s); allowed: {options}")
    return shape


def check_mesh_value(value: MeshValue, key: str = KEY) -> None:
    """What can be checked before the world size is known (the config loader): keys and sizes."""
    if isinstance(value, Mapping):
        sizes = [v for v in value.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        world = 1
        for size in sizes:
            world *= size
        parse_mesh(value, world, key)
    elif value is not None:
        parse_mesh(value, 1, key)


def wants_tensor_parallel(value: MeshValue) -> bool:
    """Whether ``comm.mesh`` may put tp > 1 (an explicit tp > 1, or auto: the planner may pick it);
    such a job needs the torch backend."""
    if is_auto(value):
        return True
    if isinstance(value, MeshShape):
        return value.tp > 1
    if isinstance(value, Mapping):
        tp = value.get("tp")
        if tp is None:  # derived from the world size: may be more than 1
            return True
        return isinstance(tp, int) and not isinstance(tp, bool) and tp > 1
    return False


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_shapes(world: int, max_tp: Optional[int] = None) -> List[MeshShape]:
    """Every (dp, tp) with dp x tp = ``world`` (tp up to ``max_tp``), tp = 1 first: the candidates
    a layout planner prices."""
    return [MeshShape(world // t, t) for t in divisors(world) if max_tp is None or t <= max_tp]


class MeshLayout:
    """This rank's place on the mesh and the torch DeviceMesh over the default process group.

    ``mesh["dp"]``/``mesh["tp"]`` are the 1-D sub-meshes; ``dp_group`` is the process group
    gradients are reduced over under ``replicate``."""

    def __init__(self, shape: MeshShape, rank: int, device_type: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.shape = shape
        self.rank = rank
        self.dp_rank, self.tp_rank = shape.coords(rank)
        self.mesh = init_device_mesh(device_type, (shape.dp, shape.tp), mesh_dim_names=DIMS)
        self.dp_mesh = self.mesh["dp"]
        self.tp_mesh = self.mesh["tp"]
        self.dp_group = self.dp_mesh.get_group()
        self.tp_group = self.tp_mesh.get_group()
        assert (self.dp_mesh.get_local_rank(), self.tp_mesh.get_local_rank()) == (self.dp_rank, self.tp_rank)

    @property
    def dp(self) -> int:
        return self.shape.dp

    @property
    def tp(self) -> int:
        return self.shape.tp
