"""One rank's training: model, data, optimizer and comm backend from the config, the swap engine
around forward, metrics, checkpoints, and a clean stop on SIGTERM/SIGINT/SIGUSR1.

Every rank runs the same loop; per step one small allreduce carries the loss (for metrics) and a
stop flag, so when any rank is asked to stop all ranks stop after the same step and checkpoint it."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmsdp.comm import get_backend, merge_traces
from lmsdp.comm.strategy import get_strategy
from lmsdp.runtime.chrome_trace import rank_path
from lmsdp.swapping import SwapEngine

from .checkpoint import CheckpointManager
from .checkpoint_sharded import ShardedCheckpointManager
from .config import Config, config_to_dict, resolve_factory
from .data import data_spec, make_batches
from .models import build_model
from .metrics import MetricsWriter, Progress, RunSummary
from lmsdp.runtime.topology import Topology, detect_topology

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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


def build_network(config: Config) -> nn.Module:
    if config.model.factory:
        model = resolve_factory(config.model.factory, "model.factory")(**config.model.kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.factory returned {type(model).__name__}, expected a torch.nn.Module")
        return model
    return build_model(config.model.name, **config.model.kwargs)


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, **opt.kwargs)
    cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    return cls(params, lr=opt.lr, weight_decay=opt.weight_decay, **opt.kwargs)


def compute_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "regress":
        return F.mse_loss(output.float(), target.float())
    if task == "lm":
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())
    return F.cross_entropy(output.float(), target)


def total_steps(config: Config, steps_per_epoch: int) -> int:
    return config.train.steps if config.train.steps > 0 else config.train.epochs * steps_per_epoch


def run_worker(config: Config, topology: Optional[Topology] = None) -> int:
    """Train per ``config`` as this rank; returns the process exit code (128+signal when stopped)."""
    topology = topology or detect_topology()
    torch.set_num_threads(topology.threads(config.launch.threads))
    device = topology.device()
    train = config.train
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(train.seed)

    backend = get_backend(config.comm, device, topology)
    rank, size = backend.rank, backend.size
    _quiet_warnings(rank)
    model = build_network(config).to(device)
    swap_config = config.swap
    if swap_config.trace:  # one file per rank unless the path says where {rank} goes
        swap_config = dataclasses.replace(swap_config, trace=rank_path(swap_config.trace, rank, size))
    engine = SwapEngine(swap_config, device)
    model = engine.wrap_model(model)
    strategy = get_strategy(config.comm, backend)  # replicate, or shard (FSDP2): who reduces gradients
    model = strategy.prepare_model(model)
    optimizer = strategy.wrap_optimizer(build_optimizer(config, model), model)
    use_amp = train.amp
    amp_dtype = torch.float16 if train.amp_dtype == "float16" else torch.bfloat16
    scaler = strategy.grad_scaler(device, enabled=use_amp and amp_dtype == torch.float16)

    checkpoints = CheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints)
    sharded = ShardedCheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, backend) \
        if strategy.sharded else None
    start_step, resumed_from = 0, None
    if train.resume:
        loaded = sharded.load_latest(model, optimizer) if sharded else checkpoints.load_latest()
        if loaded is not None:
            resumed_from, state = loaded
            if not sharded:  # a sharded checkpoint is loaded in place, shard by shard
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng(state.get("rng"), rank)
            start_step = int(state["step"])
    strategy.sync_state(model, optimizer)

    batches, steps_per_epoch = make_batches(config, rank, size)
    steps = total_steps(config, steps_per_epoch)
    task = data_spec(config).task
    is_main = rank == 0
    if is_main and resumed_from:
        print(f"[lmsdp] resumed from {resumed_from} at step {start_step}/{steps}", file=sys.stderr, flush=True)

    stop = StopRequest()
    stop.install()
    metrics = MetricsWriter(config.output_dir, rank, resumed_at=start_step)
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
                loss = compute_loss(task, model(inputs), targets)
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
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss_sum / size, "step_time_s": elapsed,
                      "samples_per_s": train.batch_size * size / elapsed, "lr": optimizer.param_groups[0]["lr"],
                      **swap_stats, **comm_stats}
            metrics.write(record)
            if is_main:
                summary.add(record)
                progress.update(record)
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

    if is_main:
        totals = summary.totals({"ranks": size, "comm_backend": backend.name, "comm_strategy": strategy.name,
                                 **_engine_totals(engine)})
        _write_json(os.path.join(config.output_dir, "summary.json"), totals)
        summary.render(totals)
    engine.close()
    merge_rank_traces(config, engine, backend)
    backend.shutdown()
    return exit_code


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
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)

