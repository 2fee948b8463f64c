"""The parallel layout of a job: ``choose_layout`` (the layout planner on the job's profiled step, for
``lmsrun plan``'s table) and ``layout_for_job`` (``comm.mesh: auto`` at job start: rank 0 profiles
and picks, as ``swap.plan: auto`` does, every rank receives that one pick)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from lmsdp.swapping.units import format_size, parse_size

from lmsdp.launcher.config.errors import UserError

from .job_plan import default_target, link_bps, plan_config, workload_from_config
from .layout_facts import compute_scale, model_facts

NO_TARGET = 1 << 62  # no memory bound (CPU without swap.memory_target): every layout fits


def configured_mesh(config: Any, world: int) -> Optional[Tuple[int, int]]:
    """``comm.mesh`` as (dp, tp) when it names one (a mesh that does not divide the world is one line)."""
    from lmsdp.comm.mesh import is_auto, parse_mesh

    mesh = config.comm.mesh
    if mesh is None or is_auto(mesh):
        return None
    shape = parse_mesh(mesh, world)
    return shape.dp, shape.tp


def check_configured(config: Any, world: int) -> None:
    """A configured ``comm.mesh`` before any profiling: dp x tp = ``world`` and a tp the model's TP plan
    divides (each a one-line UserError)."""
    configured = configured_mesh(config, world)
    if configured is None or configured[1] == 1:
        return
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmsdp.comm.tensor_parallel import plan_tensor_parallel

    from .build import build_network

    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        plan_tensor_parallel(build_network(config), config.comm.tp_plan or None, bool(config.comm.sequence_parallel),
                             configured[1])


def choose_layout(config: Any, profiles: Dict[str, Any], target: int, link: float, world: int, rates: Any,
                  device: Any, backend: str = "", ranks_here: Optional[int] = None,
                  compute: Optional[float] = None) -> Any:
    """Every layout of ``world`` ranks estimated on ``profiles`` (the job's step profiled on one rank at
    its batch) and the fastest that fits ``target``; a configured mesh whose tp the model cannot split
    is the TP plan's one line. ``compute``: the measured slowdown of a rank's compute when every rank
    runs (else from cores, ranks and threads on a CPU)."""
    from lmsdp.swapping.layout import choose

    base = profiles["none"]
    facts = model_facts(config, workload_from_config(config), base.batch, world)
    configured = configured_mesh(config, world)
    if configured is not None and configured[1] in facts.refused:
        raise UserError(facts.refused[configured[1]])
    threshold = parse_size(config.swap.threshold) or 0
    scale = compute if compute is not None else compute_scale(config, ranks_here or world, device)
    return choose(profiles, world, facts, target, link, threshold, rates, backend or config.comm.backend, scale)


def layout_for_job(config: Any, backend: Any, device: Any, ranks_here: int) -> Any:
    """``comm.mesh: auto``: the config with ``comm.mesh`` and ``comm.strategy`` set to the layout rank 0
    picks (collective rates timed over this job's ranks first, all ranks taking part); else ``config``."""
    from lmsdp.comm.mesh import is_auto

    if not is_auto(config.comm.mesh):
        return config
    import torch

    from lmsdp.comm.collective_rates import compute_share, fit_all, time_allreduce, time_collectives, work_s
    from lmsdp.swapping.layout import CommRates

    times: Dict[str, Dict[int, float]] = {}
    if backend.size > 1:  # every rank takes part: the job's own links, as the layout will use them
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            times = time_collectives()
        else:
            times = {"allreduce": time_allreduce(lambda t: backend.allreduce(t, op="sum"))}
    share: Optional[float] = (compute_share(backend.barrier, lambda: work_s() if backend.rank == 0 else 0.0)
             if backend.size > 1 and device.type == "cpu" else None)
    pick: Optional[Tuple[int, int, str, str]] = None
    error = ""
    if backend.rank == 0:
        try:  # planning builds and runs models: the job's RNG streams must not notice
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                target = (default_target(config, device, None)
                          if config.swap.memory_target or device.type == "cuda" else NO_TARGET)
                link = link_bps(device, None)
                result = plan_config(config, target, config.train.batch_size, link, device)
                rates = (CommRates.measured(fit_all(backend.size, times), f"measured over the job's {backend.size} ranks"
                                            + (f", compute x{share:.2f} when all run" if share else ""))
                         if times else CommRates(0.0, 1e12, "one rank: no collectives"))
                choice = choose_layout(config, result.profiles, target, link, backend.size, rates, device,
                                       backend.name, ranks_here, share)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if choice.chosen is None:
                best = min(choice.estimates, key=lambda e: e.peak_bytes, default=None)
                lowest = f"; the lowest peak is {format_size(best.peak_bytes)} ({best.layout.name})" if best else ""
                error = (f"comm.mesh: auto: no layout of {backend.size} ranks fits swap.memory_target "
                         f"{format_size(target)} at batch {config.train.batch_size}{lowest}")
            else:
                c = choice.chosen
                pick = (c.layout.dp, c.layout.tp, c.layout.strategy, c.why)
        except UserError as exc:
            error = str(exc)
    pick, error = backend.allgather_object((pick, error))[0]
    if error:
        raise UserError(error)
    assert pick is not None
    dp, tp, strategy, why = pick
    if backend.rank == 0:
        print(f"[lmsdp] layout: comm.mesh={{dp: {dp}, tp: {tp}}} comm.strategy={strategy} ({why})", flush=True)
    return dataclasses.replace(config, comm=dataclasses.replace(config.comm, mesh={"dp": dp, "tp": tp},
                                                                strategy=strategy))


__all__ = ["configured_mesh", "check_configured", "choose_layout", "layout_for_job", "NO_TARGET"]
