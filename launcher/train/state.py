"""What a checkpoint holds and where it goes: ``checkpoint_state`` is the one description of a run's
state (step, loss scaler, every rank's RNG, config, world size; the model and optimizer go in through
the manager), and ``Checkpoints`` is the one interface the trainer saves through, whole-model (rank 0
writes) or sharded (every rank writes its shards)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol

import torch
from torch import nn

from lmsdp.launcher.config import Config, config_to_dict

from .checkpoint import CheckpointManager
from .checkpoint_sharded import ShardedCheckpointManager


class Checkpoints(Protocol):
    """Save ``step``'s state; returns the path written (None on ranks that write nothing)."""

    def save(self, step: int, model: nn.Module, optimizer: Any, extra: Dict[str, Any]) -> Optional[str]: ...


class WholeModelCheckpoints:
    """replicate: every rank holds the same weights, so rank 0 writes one file for all."""

    def __init__(self, manager: CheckpointManager, is_main: bool) -> None:
        self.manager, self.is_main = manager, is_main

    def save(self, step: int, model: nn.Module, optimizer: Any, extra: Dict[str, Any]) -> Optional[str]:
        if not self.is_main:
            return None
        return self.manager.save(step, {**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()})


def checkpoints_for(config: Config, strategy: Any, backend: Any, whole: CheckpointManager) -> Checkpoints:
    """Sharded checkpoints under ``shard`` (every rank writes its shards), one whole file otherwise."""
    if strategy.sharded:
        return ShardedCheckpointManager(config.checkpoint_dir, config.train.keep_checkpoints, backend)
    return WholeModelCheckpoints(whole, backend.rank == 0)


def checkpoint_state(step: int, config: Config, scaler: Any, rngs: List[Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    """Everything but the model and optimizer that a resumed run needs (``rngs``: every rank's)."""
    return {"step": step, "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
            "config": config_to_dict(config), "world_size": world_size}


def restore_state(state: Dict[str, Any], scaler: Any, rank: int) -> int:
    """Put back what ``checkpoint_state`` saved (scaler, this rank's RNG); returns the step."""
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng(state.get("rng"), rank)
    return int(state["step"])


def get_rng() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(states: Optional[List[Dict[str, Any]]], rank: int) -> None:
    if not states or rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
