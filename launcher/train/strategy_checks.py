"""Checks of ``comm.strategy`` that need the world size or the model, done by ``lmsrun`` before any
rank starts, so a bad combination is one line and exit 2 instead of N failing ranks. The ranks
check the same again (``comm/shard.py``) when run without lmsrun's front end."""
from __future__ import annotations

from typing import Any, Callable

from lmsdp.launcher.config.errors import ConfigError


def check_strategy(config: Any, world_size: int) -> None:
    """shard needs two or more ranks (one only with GPU offload) and ``comm.shard_modules`` must
    name classes of the model (built on the meta device: no memory, no time)."""
    comm = config.comm
    check_mesh(config, world_size)
    if comm.strategy != "shard":
        return
    if comm.compression != "none":
        raise ConfigError(f"comm.compression: {comm.compression} applies to replicate's allreduce; under "
                          "shard set comm.mixed_precision.reduce_dtype: float16 (or bfloat16) instead")
    if comm.op != "average":
        raise ConfigError(f"comm.op: {comm.op} is not available under shard (FSDP averages gradients); "
                          "use average, or strategy replicate")
    import torch

    offload_on_gpu = comm.offload == "optimizer_and_params" and torch.cuda.is_available()
    from lmsdp.comm.mesh import parse_mesh

    world_size = parse_mesh(comm.mesh, world_size).dp  # shard applies along the mesh's dp
    if world_size < 2 and not offload_on_gpu:
        raise ConfigError("comm.strategy: shard needs 2 or more ranks (this job has 1: nothing to shard "
                          "across); use replicate, run with -np 2 or more, or add "
                          "comm.offload: optimizer_and_params on a GPU")
    if comm.shard_modules:
        from lmsdp.comm.shard import named_blocks

        _check_on_meta(config, lambda model: named_blocks(model, comm.shard_modules))


def check_mesh(config: Any, world_size: int) -> None:
    """``comm.mesh``: D x T = world size, and with tp > 1 a tensor-parallel plan for the model
    (built on the meta device) that divides by T."""
    from lmsdp.comm.mesh import parse_mesh
    from lmsdp.runtime.errors import UserError

    try:
        shape = parse_mesh(config.comm.mesh, world_size)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    if shape.tp < 2:
        return
    from lmsdp.comm.tensor_parallel import plan_tensor_parallel

    _check_on_meta(config, lambda model: plan_tensor_parallel(model, config.comm.tp_plan,
                                                              config.comm.sequence_parallel, shape.tp))


def _check_on_meta(config: Any, check: Callable[[Any], Any]) -> None:
    """Run ``check`` on the model built on the meta device (no memory): its UserError becomes the
    job's one-line ConfigError before any rank starts; a factory that cannot build on meta is
    checked by the ranks instead."""
    import torch

    from lmsdp.runtime.errors import UserError

    from .build import build_network

    try:
        with torch.device("meta"):
            model = build_network(config)
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta: the ranks check instead
        return
    try:
        check(model)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
