"""Sharded checkpoints (``comm.strategy: shard``): every rank writes its own shards with
torch.distributed.checkpoint (DCP); same ``step-<N>`` naming, newest-valid-wins and retention as
``launcher/train/checkpoint.py``, but each checkpoint is a folder.

Atomic like the single-file checkpoints: all ranks write into ``.tmp-step-<N>/``; DCP's
coordinator (rank 0) writes ``.metadata`` once every rank's files are fsynced; then rank 0 writes
``lmsdp.pt`` (step, loss scaler, every rank's RNG state, config) and renames the folder to
``step-<N>``. A folder without both files is never loaded; a damaged one is skipped for the next
older one, on every rank alike (rank 0 chooses, the others follow). Nothing read runs code
(launcher/train/checkpoint_trust.py): ``lmsdp.pt`` and DCP's byte items load weights-only, ``.metadata``
through an unpickler that knows DCP's metadata classes only; a folder needing more is refused like a
damaged one. ``.tmp-step-<N>/`` is made private (0700) while written, so nobody plants a link in it.

DCP reshards on load, so a folder written by N ranks loads into M ranks under shard; the
converters at the end move state between this layout (full state, optimizer keyed by parameter
name) and a replicate checkpoint's (``step-N.pt``: optimizer keyed by index), so either strategy
resumes the other's checkpoints (launcher/train/resume.py chooses)."""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from lmsdp.runtime.new_file import current_umask, open_new

from .checkpoint import fsync_dir, skip_line
from .checkpoint_trust import (DCP_METADATA, UnsafeCheckpoint, check_dcp_folder, load_weights_only, make_plain,
                               safe_full_planner, safe_planner, safe_reader)

META = "lmsdp.pt"
_NAME = re.compile(r"^step-(\d{8,})$")


def is_sharded_checkpoint(path: str) -> bool:
    """A finished sharded checkpoint folder (DCP metadata and lmsdp's own state both present)."""
    return os.path.isfile(os.path.join(path, DCP_METADATA)) and os.path.isfile(os.path.join(path, META))


def sharded_candidates(directory: str) -> List[Tuple[int, str]]:
    """(step, folder) of finished sharded checkpoints, newest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        path = os.path.join(directory, name)
        if match and is_sharded_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


@dataclass
class ShardedCheckpointManager:
    """Save/load the sharded model and optimizer of every rank; ``backend`` is the comm backend
    (barrier and small object exchange)."""

    directory: str
    keep: int
    backend: Any

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}")

    def save(self, step: int, model: nn.Module, optimizer: Any, extra: Dict[str, Any]) -> str:
        """Called on every rank. ``extra`` (step, scaler, rng of all ranks, config) goes to
        ``lmsdp.pt`` from rank 0. Returns the folder."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        is_main = self.backend.rank == 0
        final = self.path_for(step)
        tmp = os.path.join(self.directory, f".tmp-step-{step:08d}")
        if is_main:
            extra = make_plain(extra, f"{META}")
            os.makedirs(self.directory, exist_ok=True)
            _remove(tmp)  # left by a crash mid-save (or a link planted at the name: the link goes)
            os.mkdir(tmp, 0o700)  # private while written: nobody else can plant names inside
        self.backend.barrier()
        model_state, optim_state = get_state_dict(model, _inner(optimizer))
        dcp.save({"model": model_state, "optimizer": optim_state},
                 storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if is_main:
            with open_new(os.path.join(tmp, META), binary=True) as handle:
                torch.save(extra, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o777 & ~current_umask())  # done: readable as the user's umask says
            fsync_dir(tmp)
            if os.path.lexists(final):  # the same step saved again (e.g. after a resume)
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(self.directory)
            self._prune()
        self.backend.barrier()  # nobody goes on (or exits) before the folder has its final name
        return final

    def load_latest(self, model: nn.Module, optimizer: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Load the newest checkpoint every rank can read into ``model``/``optimizer`` in place;
        returns (folder, extra) or None when there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        def read(path: str) -> Dict[str, Any]:  # DCP reshards into this job's sharded model
            model_state, optim_state = get_state_dict(model, _inner(optimizer))
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner(path))
            return state

        def apply(state: Dict[str, Any]) -> None:
            set_state_dict(model, _inner(optimizer), model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])

        return self._load_first_good(read, apply)

    def load_latest_full(self, model: nn.Module, optimizer: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Replicate resuming a sharded checkpoint: every rank reads the whole folder in its own process
        (no collectives: any backend) into its full ``model``/``optimizer``; same skip-the-damaged rule."""
        def read(path: str) -> Dict[str, Any]:
            state = read_full(path)
            return {"model": state["model"], "optimizer": optim_by_index(state["optimizer"], optimizer, model)}

        def apply(state: Dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])

        return self._load_first_good(read, apply)

    def _load_first_good(self, read: Callable[[str], Dict[str, Any]], apply: Callable[[Dict[str, Any]], None]
                         ) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Newest first (rank 0's listing, one view for every rank): ``read`` a folder on every rank; if
        any rank failed, all skip it together (one warning line) for the next older; else ``apply``."""
        choices = self.backend.allgather_object(sharded_candidates(self.directory) if self.backend.rank == 0
                                                else None)[0]
        for _, path in choices:
            problem, state = None, None
            try:
                extra = load_weights_only(os.path.join(path, META), os.path.join(path, META))
                if not isinstance(extra, dict) or "step" not in extra:
                    raise ValueError(f"{META} is not lmsdp's (missing 'step')")
                check_dcp_folder(path)
                state = read(path)
            except BaseException as exc:  # noqa: BLE001 - do not trust this folder (DCP's
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # CheckpointException is a BaseException)
                    raise
                problem = skip_line(path, _cause(exc))
            problems = [p for p in self.backend.allgather_object(problem) if p]
            if problems:
                if self.backend.rank == 0:
                    print(problems[0], file=sys.stderr, flush=True)
                continue
            apply(state)  # type: ignore[arg-type]
            return path, extra
        return None

    def _prune(self) -> None:
        for _, path in sharded_candidates(self.directory)[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)


def _cause(exc: BaseException) -> BaseException:
    """DCP wraps each rank's error (CheckpointException: {rank: WrappedException}); the cause is the useful part."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = getattr(next(iter(failures.values())), "exc", None)
        if isinstance(inner, BaseException):
            return inner
    return exc


def _remove(path: str) -> None:
    """Remove a folder of ours, or just the name when it is a link or a file (never a link's target)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


# ------------------------------------------------------------- moving state between the layouts
def read_full(path: str, keys: Tuple[str, ...] = ("model", "optimizer")) -> Dict[str, Any]:
    """The full (unsharded) ``keys`` of a DCP folder, read in this process alone (torch's
    dcp_to_torch_save does the same; ``dcp.load`` would fill a copy, not the dict passed)."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_dcp_folder(path)
    state: Dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": intended here
        try:
            _load_state_dict(state, storage_reader=safe_reader(path), planner=safe_full_planner(path, keys=set(keys)),
                             no_dist=True)
        except BaseException as exc:  # noqa: BLE001 - DCP wraps ours in a CheckpointException
            if isinstance(_cause(exc), UnsafeCheckpoint):
                raise _cause(exc) from None
            raise
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{path} holds no {' or '.join(missing)} state")
    return state


def _params_in_order(optimizer: Any, model: nn.Module) -> Iterator[Tuple[int, str]]:
    """(index in torch's optimizer state_dict, parameter name) for every parameter the optimizer holds."""
    names = {id(p): name for name, p in model.named_parameters()}
    index = 0
    for group in _inner(optimizer).param_groups:
        for param in group["params"]:
            yield index, names[id(param)]
            index += 1


def optim_by_name(state: Dict[str, Any], optimizer: Any, model: nn.Module) -> Dict[str, Any]:
    """A replicate checkpoint's optimizer state (``optimizer.state_dict()``: parameters by index)
    keyed by parameter name, as ``set_state_dict`` takes it. Both strategies build the optimizer
    over ``model.parameters()``, so index i is the i-th parameter of this optimizer."""
    name_of = dict(_params_in_order(optimizer, model))
    return {"state": {name_of[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]}


def optim_by_index(state: Dict[str, Any], optimizer: Any, model: nn.Module) -> Dict[str, Any]:
    """The inverse: a sharded checkpoint's optimizer state (by name) for ``optimizer.load_state_dict``."""
    index_of = {name: i for i, name in _params_in_order(optimizer, model)}
    unknown = sorted(set(state["state"]) - set(index_of))
    if unknown:
        raise ValueError(f"optimizer state for parameters this model lacks: {', '.join(unknown[:3])}")
    return {"state": {index_of[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index_of[n] for n in g["params"]]} for g in state["param_groups"]]}


def load_full_into_sharded(model: nn.Module, optimizer: Any, state: Dict[str, Any]) -> None:
    """Shard resuming a replicate checkpoint: every rank holds the full state and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"],
                   optim_state_dict=optim_by_name(state["optimizer"], optimizer, model),
                   options=StateDictOptions(full_state_dict=True))
