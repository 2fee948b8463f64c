"""The job-start side of ``swap.plan``: build the job's workload exactly as a rank does, profile one
step and plan it (``auto``: rank 0 plans, every rank receives the plan) or read a plan file
(``FILE``), and the predicted-vs-measured log line. ``lmsrun plan`` (tools/plan.py) prints the same
plans as a table."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from lmsdp.swapping.units import format_size, parse_size

from lmsdp.launcher.config.errors import UserError


def workload_from_config(config: Any) -> Any:
    """A planner ``Workload`` built with the worker's own builders (model, batches, optimizer, loss)."""
    from lmsdp.swapping.profile import Workload

    from lmsdp.launcher.train.build import amp_dtype, build_network, build_optimizer
    from lmsdp.launcher.train.loss import StepLoss

    step_loss = StepLoss.from_config(config)

    make_batch = _SampleBatch(config)
    amp = amp_dtype(config)
    label = f"model.factory: {config.model.factory}" if config.model.factory else f"model.name: {config.model.name}"
    return Workload(build_model=lambda: build_network(config), make_batch=make_batch,
                    loss=step_loss.loss, forward=step_loss.forward,
                    build_optimizer=lambda model: build_optimizer(config, model), autocast=amp, label=label)


class _SampleBatch:
    """Batches of any size of the job's data, for the planner: only shapes matter there.

    The dataset is real data (files read, images decoded, a user's factory, synthetic targets computed
    from values), so it is built and read outside the planner's fake-tensor mode, once; a batch of ``n`` is the first sample repeated, which
    under fake mode costs no memory and is not bounded by the dataset's length (the largest-batch search
    goes beyond it)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.first: Optional[Tuple[Any, Any]] = None

    def __call__(self, n: int) -> Tuple[Any, Any]:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from lmsdp.launcher.train.data import make_batches

        if self.first is None:
            one = dataclasses.replace(self.config, train=dataclasses.replace(self.config.train, batch_size=1))
            with unset_fake_temporarily():
                self.first = make_batches(one, 0, 1)[0].batch(0)
        inputs, targets = self.first
        return (inputs.expand(n, *inputs.shape[1:]).contiguous(),
                targets.expand(n, *targets.shape[1:]).contiguous())


def default_target(config: Any, device: Any, flag: Optional[str]) -> int:
    if flag is not None:
        try:
            value = parse_size(flag)
        except (ValueError, TypeError):
            value = None
        if not value or value <= 0:
            raise UserError(f"--memory: '{flag}' is not a size; use bytes or a unit, e.g. 16GiB or 512MB")
        return int(value)
    if config.swap.memory_target:
        return int(config.swap.memory_target)
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    raise UserError("--memory: required without a GPU (or set swap.memory_target); e.g. --memory 8GiB")


def link_bps(device: Any, gbps: Optional[float]) -> float:
    from lmsdp.swapping.profile import link_bandwidth

    if gbps is not None:
        if gbps <= 0:
            raise UserError(f"--link-gbps: expected a positive number of GB/s, got {gbps:g}")
        return gbps * 1e9
    return link_bandwidth(device)


def _time_batch(workload: Any, batch: int, requested: Optional[int]) -> int:
    if requested is not None:
        if requested < 0:
            raise UserError(f"--time-batch: expected 0 or more, got {requested}")
        return requested
    from lmsdp.swapping.profile import sizes_profile

    saved = sum(t.nbytes for t in sizes_profile(workload, batch, None, 0).tensors)  # one fake run
    return batch if saved <= (1 << 30) else 1


def _variants(config: Any) -> List[Any]:
    from lmsdp.swapping.profile import RECOMPUTE_VARIANTS

    variants = list(RECOMPUTE_VARIANTS)
    if config.swap.recompute and config.swap.recompute not in variants:
        variants.append(config.swap.recompute)
    return variants


def _configured(config: Any) -> Tuple[int, Any]:
    """The swap threshold and the configured engine settings (None with swap off), for the table's row."""
    from lmsdp.swapping.plan_models import Settings

    swap = config.swap
    threshold = parse_size(swap.threshold) or 0
    return threshold, (Settings(threshold, swap.prefetch, swap.keep_last, parse_size(swap.budget) or 0)
                       if swap.enabled else None)


def batch_planner(config: Any, target: int, link: float, flops_rate: float, workload: Any = None,
                  optimizer_bytes: Optional[int] = None) -> Any:
    """The planner at any batch for this job, times from FLOPs at ``flops_rate`` (``BatchPlanner``)."""
    from lmsdp.swapping.batch_profiles import BatchProfiles
    from lmsdp.swapping.batch_search import BatchPlanner
    from lmsdp.swapping.profile import optimizer_state_bytes

    workload = workload or workload_from_config(config)
    opt_bytes = optimizer_state_bytes(workload) if optimizer_bytes is None else optimizer_bytes
    threshold, configured = _configured(config)
    return BatchPlanner(BatchProfiles(workload, flops_rate, opt_bytes), target, link, threshold, _variants(config),
                        configured, config.swap.recompute, disk_model(config))


def _per_rank(config: Any, workload: Any, base: Any, world: Optional[int]) -> Callable[[Any], Any]:
    """How one rank of the job's ``comm.mesh`` sees a one-rank profile: with tp > 1 the layout planner's
    division (a split region's saved tensors and compute by tp, the rank's parameter and state bytes),
    which is also what the swap engine packs per rank, tensor for tensor; else (or ``world`` None: the
    whole model, as ``lmsrun plan`` and the layout planner want it) the profile itself."""
    from lmsdp.comm.mesh import parse_mesh

    shape = parse_mesh(config.comm.mesh, world) if world is not None else None
    if shape is None or shape.tp <= 1:
        return lambda profile: profile
    from lmsdp.swapping.layout import Layout, rank_state
    from lmsdp.swapping.layout_profile import layout_profile

    from .layout_facts import model_facts

    facts = model_facts(config, workload, base.batch, world)
    split = facts.splits[shape.tp]
    state = rank_state(base, Layout(shape.dp, shape.tp, config.comm.strategy), split, facts)
    return lambda profile: layout_profile(profile, split, state)


def plan_config(config: Any, target: int, batch: int, link: float, device: Any,
                time_batch: Optional[int] = None, tflops: Optional[float] = None,
                world: Optional[int] = None) -> Any:
    """Profile the job's step at ``batch`` and plan it for ``target`` device bytes (``tflops``: times
    from FLOPs at that rate, on the same profiles the largest-batch search uses). ``world``: the job's
    ranks, so that under ``comm.mesh`` with tp > 1 the plan is one rank's (its local shards); None:
    the whole model's step."""
    from lmsdp.swapping.planner import plan
    from lmsdp.swapping.profile import profile_aligned, profile_variants

    if tflops:
        return batch_planner(config, target, link, tflops * 1e12).plan(batch)
    workload = workload_from_config(config)
    tb = _time_batch(workload, batch, time_batch)
    profiles = profile_variants(workload, batch, device, tb, _variants(config))
    threshold, configured = _configured(config)
    base = profiles["none"]
    rank = _per_rank(config, workload, base, world)
    return plan({key: rank(p) for key, p in profiles.items()}, target, link, threshold, configured,
                config.swap.recompute, profile_spec=lambda spec: rank(profile_aligned(workload, base, spec, device)),
                disk=disk_model(config))


def disk_model(config: Any) -> Any:
    """The disk tier's rates for the planner (a short probe in ``swap.disk_dir``), None without one."""
    if not (config.swap.enabled and config.swap.disk_dir):
        return None
    from lmsdp.swapping.plan_models import DiskModel
    from lmsdp.swapping.rates import disk_bandwidth

    write_bps, read_bps = disk_bandwidth(config.swap.disk_dir)
    return DiskModel(parse_size(config.swap.host_limit) or (1 << 62), write_bps, read_bps)


# --------------------------------------------------------------------------------------- printing
def read_plan_file(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        doc = data["plan"]
        doc["swap"], doc["tensors"]["sizes"], doc["tensors"]["swap"]  # noqa: B018 - shape check
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(f"swap.plan: {path} is not a plan file from 'lmsrun plan --write' "
                        f"({type(exc).__name__})") from None
    return doc


# ------------------------------------------------------------------------------------ job start
@dataclasses.dataclass
class JobPlan:
    """What a rank runs with under ``swap.plan``: swap settings, the engine policy, the prediction."""

    swap_config: Any
    policy: Any
    document: Dict[str, Any]


def plan_for_job(config: Any, backend: Any, device: Any) -> Optional[JobPlan]:
    """``swap.plan: auto``: rank 0 profiles and plans, every rank receives that one plan (profiles are
    timed, so plans made on each rank could differ by noise; one planner keeps the ranks identical).
    ``swap.plan: FILE``: every rank reads the same file."""
    from lmsdp.swapping.planner import policy_from_document

    mode = config.swap.plan
    if mode == "none":
        return None
    if mode == "auto":
        doc: Optional[Dict[str, Any]] = None
        error = ""
        if backend.rank == 0:
            import torch

            try:  # planning builds and runs models: the job's RNG streams must not notice
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    target = default_target(config, device, None)
                    result = plan_config(config, target, config.train.batch_size, link_bps(device, None), device,
                                         world=backend.size)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if result.chosen is None:
                    error = f"swap.memory_target: batch {config.train.batch_size} does not fit: {result.shortfall()}"
                else:
                    from lmsdp.swapping.planner import plan_document

                    doc = plan_document(result)
            except UserError as exc:
                error = str(exc)
        doc, error = backend.allgather_object((doc, error))[0]
        if error:
            raise UserError(error)
    else:
        doc = read_plan_file(mode)
        if int(doc.get("batch", 0)) != config.train.batch_size and backend.rank == 0:
            warnings.warn(f"lmsdp plan: {mode} was made for batch {doc.get('batch')}, this job runs batch "
                          f"{config.train.batch_size}; tensors that do not match the plan stay on the device",
                          RuntimeWarning, stacklevel=2)
    assert doc is not None
    swap = doc["swap"]
    swap_config = dataclasses.replace(config.swap, threshold=int(swap["threshold"]), prefetch=int(swap["prefetch"]),
                                      recompute=swap["recompute"], enabled=True)  # a plan implies the engine
    return JobPlan(swap_config, policy_from_document(doc), doc)


def plan_log_line(plan: JobPlan, step: int, record: Dict[str, Any]) -> str:
    """Predicted next to measured, for rank 0's log every ``log_every`` steps."""
    doc = plan.document
    line = (f"[lmsdp] plan step {step}: saved peak predicted {format_size(doc['predicted_peak_saved_bytes'])}, "
            f"measured {format_size(record.get('peak_saved_bytes', 0))}; device peak predicted "
            f"{format_size(doc['predicted_peak_bytes'])}")
    if record.get("max_memory_allocated"):
        line += f", measured {format_size(record['max_memory_allocated'])}"
    line += f"; step predicted {doc['predicted_step_s'] * 1e3:.1f} ms, measured {record['step_time_s'] * 1e3:.1f} ms"
    if plan.policy.mismatches:
        line += (f"; {plan.policy.mismatches} saved tensors so far did not match the plan and stayed on the device "
                 "(plan again for this model and batch)")
    return line


def presize_host_pool(config: Any, engine: Any) -> int:
    """Reserve the pinned host buffers the engine will swap into, before step 1 (a pinned allocation in
    the pack hook is an implicit device sync), from a fake-tensor record of the job's step. Only where
    the pool pins memory (CUDA): pageable buffers cost no sync. A step the fake run cannot size keeps
    the old way (buffers allocated during step 1), said once. Returns the bytes reserved."""
    if not engine.enabled or not engine.pool.pin_memory:
        return 0
    from lmsdp.swapping.presize import presize_host_pool as reserve, settings_of
    from lmsdp.swapping.profile import sizes_profile

    import torch

    try:  # the fake run seeds torch's generators: the job's RNG streams must not notice
        with torch.random.fork_rng(devices=[engine.device] if engine.device.type == "cuda" else []):
            profile = sizes_profile(workload_from_config(config), config.train.batch_size,
                                    engine.config.recompute or None, 0)
    except Exception as exc:  # noqa: BLE001 - an optimisation: the engine works without it
        warnings.warn(f"lmsdp: host pool not sized before step 1 ({type(exc).__name__}: {str(exc)[:120]}); "
                      "step 1 allocates its pinned buffers as it swaps", RuntimeWarning, stacklevel=2)
        return 0
    return reserve(engine.pool, profile, settings_of(engine.policy))
