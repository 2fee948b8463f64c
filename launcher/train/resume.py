"""``--resume``: load the newest checkpoint of either kind into the running job, whatever strategy
and world size wrote it.

=======================  =========================================================================
checkpoint \\ this job    how it loads
=======================  =========================================================================
sharded, into shard      DCP reshards: a folder of N ranks loads into M ranks (N, M >= 2)
sharded, into replicate  every rank reads the whole folder in its own process (any backend)
``step-N.pt``, shard     every rank reads the file; ``set_state_dict`` keeps each rank's shards
``step-N.pt``, replicate as always (rank 0's state is broadcast afterwards)
=======================  =========================================================================

Model and optimizer state carry over exactly. The data position does not always: batches depend on
(seed, step, rank) and, with ``data.factory``, step s of R ranks x batch B reads samples
[s*R*B, (s+1)*R*B) of the epoch's order. So when the world size changes, one line says whether the
next steps see the batches an uninterrupted run would (a dataset with the same global batch) or
not (synthetic data is drawn per rank; a different global batch shifts every sample)."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from .checkpoint import CheckpointManager
from .checkpoint_sharded import ShardedCheckpointManager, load_full_into_sharded, sharded_candidates
from lmsdp.launcher.config import Config

SHARDED, FULL = "sharded", "full"


def resume(config: Config, backend: Any, strategy: Any, model: nn.Module, optimizer: Any,
           checkpoints: CheckpointManager) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Load the newest usable checkpoint into ``model``/``optimizer`` in place (a damaged one falls
    back to the next older, across both kinds); returns (path, its extra state) or None."""
    sharded = ShardedCheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, backend)
    for kind in _kinds_newest_first(backend, checkpoints):
        loaded = _load(kind, strategy.sharded, sharded, checkpoints, model, optimizer)
        if loaded is not None:
            if backend.rank == 0:
                for line in carry_over_notes(loaded[1], config, strategy.name, backend.size):
                    print(line, file=sys.stderr, flush=True)
            return loaded
    return None


def _kinds_newest_first(backend: Any, checkpoints: CheckpointManager) -> List[str]:
    """Rank 0 looks (one view of the folder for every rank): the kind holding the newest step first."""
    if backend.rank == 0:
        newest = {kind: found[0][0] for kind, found in
                  ((SHARDED, sharded_candidates(checkpoints.directory)), (FULL, checkpoints.candidates())) if found}
        order = sorted(newest, key=lambda kind: -newest[kind])
    else:
        order = None
    return backend.allgather_object(order)[0]


def _load(kind: str, into_sharded: bool, sharded: ShardedCheckpointManager, checkpoints: CheckpointManager,
          model: nn.Module, optimizer: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
    if kind == SHARDED:
        return sharded.load_latest(model, optimizer) if into_sharded else sharded.load_latest_full(model, optimizer)
    loaded = checkpoints.load_latest()
    if loaded is not None:
        state = loaded[1]
        if into_sharded:
            load_full_into_sharded(model, optimizer, state)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
    return loaded


def carry_over_notes(extra: Dict[str, Any], config: Config, strategy: str, size: int) -> List[str]:
    """The lines rank 0 prints when the checkpoint was written by another strategy or world size."""
    saved = extra.get("config") or {}
    saved_strategy = (saved.get("comm") or {}).get("strategy", "replicate")
    saved_size = int(extra.get("world_size") or size)
    lines = []
    if saved_strategy != strategy:
        lines.append(f"[lmsdp] checkpoint of comm.strategy {saved_strategy} loaded into {strategy}: "
                     "model and optimizer state carry over")
    if saved_size == size:
        return lines
    saved_batch = int((saved.get("train") or {}).get("batch_size") or config.train.batch_size)
    before, now = saved_batch * saved_size, config.train.batch_size * size
    where = f"checkpoint of {saved_size} rank(s) resumed on {size}"
    if config.data.kind == "factory" and before == now:
        lines.append(f"[lmsdp] {where}: the global batch stays {now} samples, so data.factory's order carries over")
    else:
        why = (f"the global batch changes from {before} to {now} samples" if before != now
               else "synthetic batches are drawn per rank")
        lines.append(f"[lmsdp] warning: {where}: {why}, so the batches after step {int(extra['step'])} are not "
                     "the ones an uninterrupted run would see (model and optimizer state carry over)")
    return lines
