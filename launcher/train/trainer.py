"""One rank's training: the parts built once from the config (``parts.build_parts``), then a Trainer
that drives them through its named stages: resume, step, save, finish. Metrics, checkpoints and a
clean stop on SIGTERM/SIGINT/SIGUSR1/SIGHUP.

Every rank runs the same loop; per step one small allreduce carries the loss (for metrics) and a
stop flag, so when any rank is asked to stop all ranks stop after the same step and checkpoint it."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from lmsdp.runtime import run_folder
from lmsdp.runtime.signals import RANK_STOP_SIGNALS, SignalHandlers
from lmsdp.runtime.topology import Topology
from lmsdp.swapping.stats import combine_steps

from lmsdp.launcher.config import Config, config_to_dict

from . import threads as module_threads
from .checkpoint import CheckpointManager
from .data import Batch, RankBatches, has_validation, loader_workers, make_batches
from .evaluate import evaluate
from .job_plan import plan_log_line
from .loss import StepLoss
from .memory_meter import MemoryMeter, peak_totals
from .metrics import MetricsWriter, Progress, RunSummary
from .outputs import engine_totals, merge_rank_traces, paths_in_output_dir, write_json
from .parts import RunParts, build_parts, claim_checkpoint_dir
from .resume import resume
from .run_folders import no_checkpoint_note
from .schedule import lr_at, set_lr
from .state import checkpoint_state, get_rng, restore_state
from .tensorboard import open_scalars


def run_worker(config: Config, topology: Topology) -> int:
    """Train per ``config`` as this rank; returns the process exit code (128+signal when stopped)."""
    workers = loader_workers(config, topology.threads(0))
    base_threads = module_threads.configure_threads(config.launch, topology, workers)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.train.seed)
    config = with_accumulation(paths_in_output_dir(config))
    whole = CheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, announce=topology.rank == 0)
    lock = claim_checkpoint_dir(whole) if topology.rank == 0 else None
    try:
        parts = build_parts(config, topology, whole, lock, base_threads)
        return Trainer(parts.config or config, parts, workers).run()  # comm.mesh: auto resolved there
    finally:
        if lock is not None:
            lock.release()


def total_steps(config: Config, micro_steps_per_epoch: int) -> int:
    """Optimizer steps of the run (``train.steps``, or epochs of ``accumulate`` micro-batches each)."""
    train = config.train
    return train.steps if train.steps > 0 else max(1, train.epochs * micro_steps_per_epoch // train.accumulate)


def with_accumulation(config: Config) -> Config:
    """``train.accumulate: K`` under replicate: the backends' optimizers reduce every K-th backward
    (their backward_passes_per_step); shard turns FSDP's gradient sync off before the last micro-batch."""
    if config.train.accumulate == 1 or config.comm.strategy != "replicate":
        return config
    return dataclasses.replace(config, comm=dataclasses.replace(config.comm,
                                                                backward_passes_per_step=config.train.accumulate))


class StopRequest:
    """Set by a signal handler; read at step boundaries (never acted on mid-step)."""

    def __init__(self) -> None:
        self.signum = 0
        self.handlers = SignalHandlers(RANK_STOP_SIGNALS, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: now
        self.signum = signum


class Trainer:
    """Drives one rank's ``RunParts``: ``resume`` -> ``step`` x N (with ``save`` when due or asked)
    -> ``finish``. Holds no model-building logic: everything it touches was built by ``build_parts``."""

    def __init__(self, config: Config, parts: RunParts, loader_workers: int = 0) -> None:
        self.config, self.parts, self.loader_workers = config, parts, loader_workers
        self.total = 0  # optimizer steps of the whole run, known once the data is (run)
        self.rank, self.size = parts.backend.rank, parts.backend.size
        # what batches this rank reads: its data-parallel group's (the tp ranks of a mesh share them)
        self.dp_rank, self.dp_size = parts.strategy.dp_rank, parts.strategy.dp_size
        self.is_main = self.rank == 0
        self.step_loss = StepLoss.from_config(config)  # reads the output of any library's model
        self.memory = MemoryMeter(parts.device)

    # ----------------------------------------------------------------------------------- stages
    def resume(self) -> Tuple[int, Optional[str]]:
        """``--resume``: the newest usable checkpoint of either kind, from any world size; the step
        to continue after (0 for a fresh start) and the checkpoint. Every rank then holds the same state."""
        parts, start_step, resumed_from = self.parts, 0, None
        if self.config.train.resume:
            loaded = resume(self.config, parts.backend, parts.strategy, parts.model, parts.optimizer, parts.whole)
            if loaded is not None:
                resumed_from, state = loaded
                start_step = restore_state(state, parts.scaler, self.rank)
            elif self.is_main and parts.checkpoint_folder is not None and no_checkpoint_note(parts.checkpoint_folder):
                print(no_checkpoint_note(parts.checkpoint_folder), file=sys.stderr, flush=True)
        parts.strategy.sync_state(parts.model, parts.optimizer)
        return start_step, resumed_from

    def step(self, step: int, micro_batches: Iterator[Batch], stop: StopRequest) -> Tuple[Dict[str, Any], bool]:
        """One optimizer step over ``train.accumulate`` micro-batches (one swap-engine step each, the
        loss scaled by 1/K so the gradient is the mean over all of them); returns its metrics record
        and whether any rank asked to stop."""
        parts, train = self.parts, self.config.train
        started = time.perf_counter()
        parts.trace_window.begin(step)
        parts.backend.step_begins()
        parts.optimizer.zero_grad(set_to_none=True)
        swap_stats: Dict[str, float] = {}
        losses = []
        for micro in range(train.accumulate):
            inputs, targets = (t.to(parts.device, non_blocking=True) for t in next(micro_batches))
            last = micro == train.accumulate - 1
            if train.accumulate > 1:
                parts.strategy.gradient_sync(parts.model, last)
            with self._autocast(), parts.engine:
                micro_loss = self.step_loss(parts.model, inputs, targets)
            parts.scaler.scale(micro_loss / train.accumulate if train.accumulate > 1 else micro_loss).backward()
            swap_stats = combine_steps(swap_stats, parts.engine.step_end())
            losses.append(micro_loss.detach())
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        if train.clip_grad_norm:
            grad_norm = parts.strategy.clip_grad_norm(parts.model, parts.optimizer, train.clip_grad_norm, parts.scaler)
        set_lr(parts.optimizer, lr_at(step, self.total, self.config.optimizer))
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        comm_stats = parts.strategy.step_stats(parts.model, parts.optimizer)
        if train.clip_grad_norm:
            comm_stats["grad_norm"] = grad_norm
        # One small collective per step carries the loss and the stop flag; built on the loss's
        # device and read back once, so the step pays a single host sync.
        flag = torch.tensor([float(bool(stop.signum))], device=loss.device)
        loss_sum, stop_votes = parts.backend.allreduce(torch.cat([loss.detach().float().reshape(1), flag]),
                                                       op="sum").tolist()
        if parts.scaler.is_enabled():  # float16: halves on a skipped step; read after the sync above, so free
            comm_stats["loss_scale"] = parts.scaler.get_scale()
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_sum / self.size, "step_time_s": elapsed,
                  "samples_per_s": train.batch_size * train.accumulate * self.dp_size / elapsed,
                  "lr": parts.optimizer.param_groups[0]["lr"], **swap_stats, **comm_stats, **self.memory.sample()}
        return record, stop_votes > 0

    def evaluate(self, validation: RankBatches) -> Dict[str, float]:
        """``eval.steps`` validation batches (the same ones every time), averaged over every rank."""
        parts = self.parts
        return evaluate(parts.model, validation.iterate(0, self.config.eval.steps), self.step_loss, parts.device,
                        parts.backend, parts.autocast)

    def save(self, step: int) -> Optional[str]:
        """Checkpoint ``step``: RNG state is per rank, so every rank's goes in; the manager decides
        who writes (rank 0 for whole-model, every rank for sharded)."""
        parts = self.parts
        rngs = parts.backend.allgather_object(get_rng())
        state = checkpoint_state(step, self.config, parts.scaler, rngs, self.size)
        return parts.checkpoints.save(step, parts.model, parts.optimizer, state)

    def finish(self, summary: RunSummary) -> None:
        """Summary and thread plan (rank 0), engine and threads closed, traces merged, backend down."""
        parts = self.parts
        peaks = peak_totals(parts.backend.allgather_object(self.memory.peaks))  # every rank's, for rank 0
        if self.is_main:
            traced = ({"traced_steps": parts.trace_window.schedule.describe()}
                      if parts.engine.tracer or parts.backend.trace_path else {})
            totals = summary.totals({"ranks": self.size, "comm_backend": parts.backend.name,
                                     "comm_strategy": parts.strategy.name, **peaks, **traced,
                                     **engine_totals(parts.engine),
                                     **(parts.per_module.summary() if parts.per_module else {})})
            if parts.per_module:
                parts.per_module.write(os.path.join(self.config.output_dir, run_folder.THREADS_PLAN))
            write_json(os.path.join(self.config.output_dir, run_folder.SUMMARY), totals)
            summary.render(totals)
        parts.engine.close()
        if parts.per_module:
            parts.per_module.close()
        merge_rank_traces(self.config, parts.engine, parts.backend)
        parts.backend.shutdown()

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        """The whole run; returns the exit code (128+signal when a stop was requested)."""
        config, train = self.config, self.config.train
        start_step, resumed_from = self.resume()
        pin = config.data.pin_memory if isinstance(config.data.pin_memory, bool) else self.parts.device.type == "cuda"
        batches, steps_per_epoch = make_batches(config, self.dp_rank, self.dp_size, self.loader_workers, pin)
        steps = self.total = total_steps(config, steps_per_epoch)
        validation = make_batches(config, self.dp_rank, self.dp_size, split="val")[0] \
            if config.eval.every and has_validation(config) else None
        if self.is_main and resumed_from:
            print(f"[lmsdp] resumed from {resumed_from} at step {start_step}/{steps}", file=sys.stderr, flush=True)
        stop = StopRequest()
        stop.handlers.install()
        metrics = MetricsWriter(config.output_dir, self.rank, resumed_at=start_step)
        scalars = open_scalars(train.tensorboard, self.is_main, config.output_dir)
        if self.is_main:  # what the run was, for `lmsrun report` (titles, budget line, comparisons)
            write_json(os.path.join(config.output_dir, run_folder.CONFIG), config_to_dict(config))
        progress = Progress(steps, start_step, train.log_every, self.is_main and train.progress, config.name)
        summary = RunSummary()
        exit_code = 0
        k = train.accumulate
        stream = batches.iterate(start_step * k, steps * k)  # micro-batches: a pure function of their index
        try:
            for step in range(start_step + 1, steps + 1):
                record, stop_now = self.step(step, stream, stop)
                if validation is not None and (step % config.eval.every == 0 or step == steps):
                    record.update(self.evaluate(validation))
                metrics.write(record)
                if scalars is not None:
                    scalars.write(record)
                if self.is_main:
                    summary.add(record)
                    progress.update(record)
                    self._log_plan(step, start_step, record)
                if stop_now or (train.checkpoint_every and step % train.checkpoint_every == 0) or step == steps:
                    path = self.save(step)
                    if stop_now:
                        # Nobody exits before rank 0's checkpoint is on disk: mpirun (and srun with
                        # --kill-on-bad-exit) would kill rank 0 mid-write once another rank exits non-zero.
                        self.parts.backend.barrier()
                        if self.is_main:
                            print(f"[lmsdp] stop requested: checkpoint {path} at step {step}", file=sys.stderr, flush=True)
                if stop_now:
                    exit_code = 128 + (stop.signum or signal.SIGTERM)
                    break
        finally:
            stop.handlers.restore()
            progress.close()
            metrics.close()
            if scalars is not None:
                scalars.close()
        self.finish(summary)
        return exit_code

    def _log_plan(self, step: int, start_step: int, record: Dict[str, Any]) -> None:
        job_plan = self.parts.job_plan
        if job_plan is not None and (step % self.config.train.log_every == 0 or step == start_step + 1):
            print(plan_log_line(job_plan, step, record), file=sys.stderr, flush=True)

    def _autocast(self) -> Any:
        dtype = self.parts.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.parts.device.type, dtype=dtype)
