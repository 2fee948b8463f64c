"""One rank's training: model, data, optimizer and comm backend from the config, the swap engine
around forward, metrics, checkpoints, and a clean stop on SIGTERM/SIGINT/SIGUSR1.

Every rank runs the same loop; per step one small allreduce carries the loss (for metrics) and a
stop flag, so when any rank is asked to stop all ranks stop after the same step and checkpoint it."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from lmsdp.comm import get_backend, merge_traces
from lmsdp.comm.base import Backend
from lmsdp.comm.strategy import Strategy, get_strategy
from lmsdp.runtime.chrome_trace import rank_path
from lmsdp.runtime.topology import Topology, detect_topology
from lmsdp.swapping import SwapEngine

from .checkpoint import CheckpointManager
from .checkpoint_lock import CheckpointLock
from .checkpoint_sharded import ShardedCheckpointManager
from .resume import resume
from .config import Config, config_to_dict, model_from_factory
from .data import make_batches
from .loss import StepLoss
from .models import build_model
from . import threads as module_threads
from .metrics import MetricsWriter, Progress, RunSummary
from .plan import JobPlan, plan_for_job, plan_log_line
from .tensorboard import open_scalars

CHECKPOINT_OVERHEAD = 64 << 10  # RNG states of every rank, the config, zip records: beyond the tensors
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)  # SIGHUP: a dropped SSH session


@dataclass
class StopRequest:
    """Set by a signal handler; read at step boundaries (never acted on mid-step)."""

    signum: int = 0
    previous: Dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: now
        self.signum = signum


@dataclass
class RunParts:
    """One rank's run as ``_build_and_train`` assembled it: what the training loop drives."""

    device: torch.device
    backend: Backend                  # rank, size, allreduce, allgather, barrier
    strategy: Strategy                # replicate or shard: who reduces gradients, who saves what
    model: nn.Module                  # wrapped by the swap engine, then prepared by the strategy
    optimizer: Any                    # the strategy's wrapper around the configured optimizer
    scaler: Any                       # loss scaler (enabled for float16 AMP only)
    engine: SwapEngine
    checkpoints: CheckpointManager    # whole-model checkpoints, rank 0 writes (sharded: one per run in _train)
    job_plan: Optional[JobPlan] = None                    # swap.plan: auto / FILE, else None
    per_module: Optional[module_threads.ModuleThreads] = None  # launch.threads: auto, else None


def build_network(config: Config) -> nn.Module:
    if config.model.factory:
        return model_from_factory(config.model, nn.Module)
    return build_model(config.model.name, **config.model.kwargs)


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, **opt.kwargs)
    cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    return cls(params, lr=opt.lr, weight_decay=opt.weight_decay, **opt.kwargs)


def total_steps(config: Config, steps_per_epoch: int) -> int:
    return config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch


def run_worker(config: Config, topology: Optional[Topology] = None) -> int:
    """Train per ``config`` as this rank; returns the process exit code (128+signal when stopped)."""
    topology = topology or detect_topology()
    base_threads = module_threads.configure_threads(config.launch, topology)
    device = topology.device()
    train = config.train
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(train.seed)

    config = _paths_in_output_dir(config)
    checkpoints = CheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, announce=topology.rank == 0)
    lock = claim_checkpoint_dir(checkpoints) if topology.rank == 0 else None
    try:
        return _build_and_train(config, topology, device, checkpoints, lock, base_threads)
    finally:
        if lock is not None:
            lock.release()


def claim_checkpoint_dir(checkpoints: CheckpointManager) -> CheckpointLock:
    """Rank 0, before anything else: the folder is writable, this job holds it (one live job per
    folder), and what a killed save left behind is removed."""
    checkpoints.check_writable()
    lock = CheckpointLock(checkpoints.directory).acquire()
    checkpoints.clean_partial()
    return lock


def _build_and_train(config: Config, topology: Topology, device: torch.device, checkpoints: CheckpointManager,
                     lock: Optional[CheckpointLock], base_threads: int) -> int:
    train = config.train
    model = build_network(config).to(device)
    if lock is not None:  # before training (and before the backend's start-up): room for a checkpoint
        checkpoints.check_space(estimate_checkpoint_bytes(model, config.optimizer))
    backend = get_backend(config.comm, device, topology)
    rank, size = backend.rank, backend.size
    _quiet_warnings(rank)
    swap_config = config.swap
    if swap_config.trace:  # one file per rank unless the path says where {rank} goes
        swap_config = dataclasses.replace(swap_config, trace=rank_path(swap_config.trace, rank, size))
    job_plan = plan_for_job(config, backend, device)  # swap.plan: auto / FILE (None otherwise)
    if job_plan is not None:
        swap_config = dataclasses.replace(job_plan.swap_config, trace=swap_config.trace)
    engine = SwapEngine(swap_config, device, policy=job_plan.policy if job_plan else None)
    model = engine.wrap_model(model)
    per_module = module_threads.attach(model, config.launch, base_threads,
                                       reduce=lambda t: backend.allreduce(t, op="sum"))
    strategy = get_strategy(config.comm, backend)  # replicate, or shard (FSDP2): who reduces gradients
    model = strategy.prepare_model(model)
    optimizer = strategy.wrap_optimizer(build_optimizer(config, model), model)
    use_amp = train.amp
    amp_dtype = torch.float16 if train.amp_dtype == "float16" else torch.bfloat16
    scaler = strategy.grad_scaler(device, enabled=use_amp and amp_dtype == torch.float16)

    parts = RunParts(device=device, backend=backend, strategy=strategy, model=model, optimizer=optimizer,
                     scaler=scaler, engine=engine, checkpoints=checkpoints, job_plan=job_plan, per_module=per_module)
    return _train(config, parts)


def estimate_checkpoint_bytes(model: nn.Module, optimizer: Any) -> int:
    """Weights plus the optimizer's per-parameter state (momentum: 1 slot, Adam: 2), before any
    state exists: the room the first checkpoint needs (``optimizer``: the optimizer: config)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    slots = 2 if optimizer.name in ("adam", "adamw") else int(optimizer.momentum > 0)
    return weights * (1 + slots) + CHECKPOINT_OVERHEAD


def _train(config: Config, parts: RunParts) -> int:
    """The training loop over ``parts``: resume, steps, metrics, checkpoints, a clean stop, the summary."""
    device, backend, strategy, engine = parts.device, parts.backend, parts.strategy, parts.engine
    model, optimizer, scaler, checkpoints = parts.model, parts.optimizer, parts.scaler, parts.checkpoints
    job_plan, per_module = parts.job_plan, parts.per_module
    train = config.train
    rank, size = backend.rank, backend.size
    use_amp = train.amp
    amp_dtype = torch.float16 if train.amp_dtype == "float16" else torch.bfloat16
    sharded = ShardedCheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, backend) \
        if strategy.sharded else None
    start_step, resumed_from = 0, None
    if train.resume:
        # either kind of checkpoint, from any world size (launcher/resume.py)
        loaded = resume(config, backend, strategy, model, optimizer, checkpoints)
        if loaded is not None:
            resumed_from, state = loaded
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng(state.get("rng"), rank)
            start_step = int(state["step"])
    strategy.sync_state(model, optimizer)

    batches, steps_per_epoch = make_batches(config, rank, size)
    steps = total_steps(config, steps_per_epoch)
    step_loss = StepLoss.from_config(config)  # reads the output of any library's model
    is_main = rank == 0
    if is_main and resumed_from:
        print(f"[lmsdp] resumed from {resumed_from} at step {start_step}/{steps}", file=sys.stderr, flush=True)

    stop = StopRequest()
    stop.install()
    metrics = MetricsWriter(config.output_dir, rank, resumed_at=start_step)
    scalars = open_scalars(train.tensorboard, is_main, config.output_dir)
    if is_main:  # what the run was, for `lmsrun report` (titles, budget line, comparisons)
        _write_json(os.path.join(config.output_dir, "config.json"), config_to_dict(config))
    progress = Progress(steps, start_step, train.log_every, is_main and train.progress, config.name)
    summary = RunSummary()
    exit_code, step = 0, start_step

    def save(at_step: int) -> Optional[str]:
        # Rank 0 writes (all ranks hold identical state); RNG state is per rank, so each rank's goes in.
        rngs = backend.allgather_object(_get_rng())
        if sharded:  # every rank writes its shards
            return sharded.save(at_step, model, optimizer, {
                "step": at_step, "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                "config": config_to_dict(config), "world_size": size})
        if not is_main:
            return None
        return checkpoints.save(at_step, {
            "step": at_step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
            "config": config_to_dict(config), "world_size": size,
        })

    try:
        for step in range(start_step + 1, steps + 1):
            started = time.perf_counter()
            inputs, targets = batches.batch(step - 1)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, use_amp, amp_dtype), engine:
                loss = step_loss(model, inputs, targets)
            scaler.scale(loss).backward()
            if train.clip_grad_norm:
                grad_norm = strategy.clip_grad_norm(model, optimizer, train.clip_grad_norm, scaler)
            scaler.step(optimizer)
            scaler.update()
            swap_stats = engine.step_end()
            comm_stats = strategy.step_stats(model, optimizer)
            if train.clip_grad_norm:
                comm_stats["grad_norm"] = grad_norm
            # One small collective per step carries the loss and the stop flag; built on the loss's
            # device and read back once, so the step pays a single host sync.
            flag = torch.tensor([float(bool(stop.signum))], device=loss.device)
            loss_sum, stop_votes = backend.allreduce(torch.cat([loss.detach().float().reshape(1), flag]),
                                                     op="sum").tolist()
            if scaler.is_enabled():  # float16: halves on a skipped step; read after the sync above, so free
                comm_stats["loss_scale"] = scaler.get_scale()
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss_sum / size, "step_time_s": elapsed,
                      "samples_per_s": train.batch_size * size / elapsed, "lr": optimizer.param_groups[0]["lr"],
                      **swap_stats, **comm_stats}
            metrics.write(record)
            if scalars is not None:
                scalars.write(record)
            if is_main:
                summary.add(record)
                progress.update(record)
                if job_plan is not None and (step % train.log_every == 0 or step == start_step + 1):
                    print(plan_log_line(job_plan, step, record), file=sys.stderr, flush=True)
            stop_now = stop_votes > 0
            if stop_now or (train.checkpoint_every and step % train.checkpoint_every == 0) or step == steps:
                path = save(step)
                if stop_now:
                    # Nobody exits before rank 0's checkpoint is on disk: mpirun (and srun with
                    # --kill-on-bad-exit) would kill rank 0 mid-write once another rank exits non-zero.
                    backend.barrier()
                    if is_main:
                        print(f"[lmsdp] stop requested: checkpoint {path} at step {step}", file=sys.stderr, flush=True)
            if stop_now:
                exit_code = 128 + (stop.signum or signal.SIGTERM)
                break
    finally:
        stop.restore()
        progress.close()
        metrics.close()
        if scalars is not None:
            scalars.close()

    if is_main:
        totals = summary.totals({"ranks": size, "comm_backend": backend.name, "comm_strategy": strategy.name,
                                 **_engine_totals(engine), **(per_module.summary() if per_module else {})})
        if per_module:
            per_module.write(os.path.join(config.output_dir, "threads_plan.json"))
        _write_json(os.path.join(config.output_dir, "summary.json"), totals)
        summary.render(totals)
    engine.close()
    if per_module:
        per_module.close()
    merge_rank_traces(config, engine, backend)
    backend.shutdown()
    return exit_code


def _paths_in_output_dir(config: Config) -> Config:
    """``{output_dir}`` in swap.trace / comm.timeline becomes the run's output directory, so a run's
    traces live with its metrics (and ``lmsrun report RUN_DIR`` finds them)."""
    def place(path: Optional[str]) -> Optional[str]:
        return path.replace("{output_dir}", config.output_dir) if path else path
    return dataclasses.replace(
        config, swap=dataclasses.replace(config.swap, trace=place(config.swap.trace)),
        comm=dataclasses.replace(config.comm, timeline=place(config.comm.timeline)))


def merge_rank_traces(config: Config, engine: SwapEngine, backend: Any) -> Optional[str]:
    """Rank 0 joins every rank's swap trace and allreduce timeline into ``<output_dir>/trace.json``:
    one process track per rank, compute / swap-out / swap-in / allreduce on one clock."""
    if not (config.swap.trace or config.comm.timeline):
        return None
    mine = [p for p in (engine.tracer.path if engine.tracer else None, backend.trace_path) if p]
    every = backend.allgather_object(mine)  # also the barrier: every rank has written its trace
    if backend.rank != 0:
        return None
    out = os.path.join(config.output_dir, "trace.json")
    merge_traces([p for paths in every for p in paths if os.path.exists(p)], out)
    print(f"[lmsdp] trace of all ranks: {out} (open in https://ui.perfetto.dev or chrome://tracing)",
          file=sys.stderr, flush=True)
    return out


def _quiet_warnings(rank: int) -> None:
    """One line per warning, and run-wide lmsdp notices from rank 0 only (N ranks, one message)."""
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"[lmsdp] {category.__name__}: {message}\n"
    if rank != 0:
        warnings.filterwarnings("ignore", message="lmsdp ")


def _autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _get_rng() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(states: Optional[List[Dict[str, Any]]], rank: int) -> None:
    if not states or rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _engine_totals(engine: SwapEngine) -> Dict[str, Any]:
    if not engine.config.enabled:
        return {}
    return {key if key.startswith("swap") else f"swap_{key}": value for key, value in engine.summary().items()
            if isinstance(value, (int, float)) and key != "steps"}


def _write_json(path: str, data: Dict[str, Any]) -> None:
    import json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:  # NaN/inf become null: bare NaN is not JSON
        json.dump(_finite(data), handle, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)



def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
