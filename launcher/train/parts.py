"""One rank's run assembled once from the config: the comm backend and strategy, the model wrapped by
the swap engine, the optimizer, the loss scaler, the checkpoint managers, the job's swap plan and the
per-module thread plan. The trainer drives what this builds and builds nothing itself."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lmsdp.comm import get_backend
from lmsdp.runtime.shared_folder import FolderView
from lmsdp.comm.base import Backend
from lmsdp.comm.strategy import Strategy, get_strategy
from lmsdp.runtime import warning_lines
from lmsdp.runtime.chrome_trace import rank_path
from lmsdp.runtime.topology import Topology
from lmsdp.runtime.trace_schedule import TraceWindow
from lmsdp.swapping import SwapEngine

from lmsdp.launcher.config import Config

from . import threads as module_threads
from .build import amp_dtype, build_network, build_optimizer
from .checkpoint import CheckpointManager
from .checkpoint_lock import CheckpointLock
from .job_layout import layout_for_job
from .job_plan import JobPlan, plan_for_job, presize_host_pool
from .state import Checkpoints, checkpoints_for
from .run_folders import check_run_folders

CHECKPOINT_OVERHEAD = 64 << 10  # RNG states of every rank, the config, zip records: beyond the tensors


@dataclass
class RunParts:
    """One rank's run as ``build_parts`` assembled it: what the trainer drives."""

    device: torch.device
    backend: Backend                  # rank, size, allreduce, allgather, barrier
    strategy: Strategy                # replicate or shard: who reduces gradients, who saves what
    model: nn.Module                  # wrapped by the swap engine, then prepared by the strategy
    optimizer: Any                    # the strategy's wrapper around the configured optimizer
    scaler: Any                       # loss scaler (enabled for float16 AMP only)
    engine: SwapEngine
    whole: CheckpointManager          # the folder's whole-model checkpoints (resume reads both kinds)
    checkpoints: Checkpoints          # where this run saves: whole-model (rank 0) or sharded (every rank)
    trace_window: TraceWindow = field(default_factory=TraceWindow)  # train.trace_steps: swap.trace, comm.timeline
    autocast: Optional[torch.dtype] = None                # train.amp's dtype, None when off
    job_plan: Optional[JobPlan] = None                    # swap.plan: auto / FILE, else None
    per_module: Optional[module_threads.ModuleThreads] = None  # launch.threads: auto, else None
    checkpoint_folder: Optional[FolderView] = None        # which hosts see the checkpoint folder
    config: Optional[Config] = None                       # the config as built (comm.mesh: auto resolved)


def claim_checkpoint_dir(checkpoints: CheckpointManager) -> CheckpointLock:
    """Rank 0, before anything else: the folder is writable, this job holds it (one live job per
    folder), and what a killed save left behind is removed."""
    checkpoints.check_writable()
    lock = CheckpointLock(checkpoints.directory).acquire()
    checkpoints.clean_partial()
    return lock


def build_parts(config: Config, topology: Topology, whole: CheckpointManager, lock: Optional[CheckpointLock],
                base_threads: int) -> RunParts:
    """Model, backend, swap engine, strategy and optimizer, in the order each needs the one before."""
    device = topology.device()
    model = build_network(config).to(device)
    if lock is not None:  # before training (and before the backend's start-up): room for a checkpoint
        whole.check_space(estimate_checkpoint_bytes(model, config.optimizer))
    backend = get_backend(config.comm, device, topology)
    warning_lines.install(backend.rank, one_line_others=True)  # one line each; lmsdp's from rank 0 only
    config = layout_for_job(config, backend, device, topology.local_size)  # comm.mesh: auto -> rank 0's pick
    strategy = get_strategy(config.comm, backend)  # replicate or shard (FSDP2) along dp; tp over a mesh
    checkpoint_folder = check_run_folders(config, backend, sharded=strategy.sharded)
    model = strategy.parallelize(model)  # comm.mesh tp > 1: the layers split over the tp ranks
    swap_config = config.swap
    if swap_config.trace:  # one file per rank unless the path says where {rank} goes
        swap_config = dataclasses.replace(swap_config, trace=rank_path(swap_config.trace, backend.rank, backend.size))
    job_plan = plan_for_job(config, backend, device)  # swap.plan: auto / FILE (None otherwise)
    if job_plan is not None:
        swap_config = dataclasses.replace(job_plan.swap_config, trace=swap_config.trace)
    trace_window = TraceWindow(config.train.trace_schedule)  # one window for every trace of this rank
    backend.trace_window(trace_window)
    engine = SwapEngine(swap_config, device, policy=job_plan.policy if job_plan else None, trace_window=trace_window)
    presize_host_pool(config, engine)  # CUDA: pinned buffers before step 1, not inside its pack hooks
    model = engine.wrap_model(model)
    per_module = module_threads.attach(model, config.launch, base_threads,
                                       reduce=lambda t: backend.allreduce(t, op="sum"))
    model = strategy.prepare_model(model)
    optimizer = strategy.wrap_optimizer(build_optimizer(config, model), model)
    autocast = amp_dtype(config)
    scaler = strategy.grad_scaler(device, enabled=autocast == torch.float16)
    return RunParts(device=device, backend=backend, strategy=strategy, model=model, optimizer=optimizer,
                    scaler=scaler, engine=engine, whole=whole,
                    checkpoints=checkpoints_for(config, strategy, backend, whole), trace_window=trace_window,
                    autocast=autocast,
                    job_plan=job_plan, per_module=per_module, checkpoint_folder=checkpoint_folder, config=config)


def estimate_checkpoint_bytes(model: nn.Module, optimizer: Any) -> int:
    """Weights plus the optimizer's per-parameter state (momentum: 1 slot, Adam: 2), before any
    state exists: the room the first checkpoint needs (``optimizer``: the optimizer: config)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    slots = 2 if optimizer.name in ("adam", "adamw") else int(optimizer.momentum > 0)
    return weights * (1 + slots) + CHECKPOINT_OVERHEAD
