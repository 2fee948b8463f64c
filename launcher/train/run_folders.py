"""Where a run's files are when the hosts do not share the folders: said once at start, and a
sharded checkpoint on a folder the hosts do not share is refused before training."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from lmsdp.runtime import env as envvars
from lmsdp.runtime.shared_folder import FolderView, check_folder

from lmsdp.launcher.config.errors import UserError


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_run_folders(config: Any, backend: Any, sharded: bool) -> FolderView:
    """Check ``train.output_dir`` and the checkpoint folder on every rank; returns the checkpoint
    folder's view (for ``--resume``'s message). Rank 0 says once where things live when a folder is
    not shared."""
    rank, gather = backend.rank, backend.allgather_object
    output = check_folder(config.output_dir, rank, gather, envvars.read(envvars.LAUNCHER))
    if _inside(config.checkpoint_dir, config.output_dir):
        checkpoints = dataclasses.replace(output, path=config.checkpoint_dir)
    else:
        checkpoints = check_folder(config.checkpoint_dir, rank, gather)
    if sharded and checkpoints.blind_hosts:
        raise UserError(f"train.checkpoint_dir: {checkpoints.path} is not the same folder on every host "
                        f"({checkpoints.where()} cannot see rank 0's files); sharded checkpoints "
                        "(comm.strategy: shard) need a folder that every host shares")
    if rank == 0:
        for view, what in ((output, "metrics, summary, trace and checkpoints"), (checkpoints, "checkpoints")):
            if not view.shared and (view is output or not _inside(view.path, output.path)):
                print(f"[lmsdp] {view.path} is not the same folder on every host (not seen from {view.where()}): "
                      f"{what} are on host {view.main_host} (rank 0): {view.path}", file=sys.stderr, flush=True)
    return checkpoints


def no_checkpoint_note(view: FolderView) -> str:
    """What ``--resume`` says when it found nothing in a folder the hosts do not share ('' if shared)."""
    if view.shared:
        return ""
    return (f"[lmsdp] --resume: no checkpoint in {view.path} on host {view.main_host} (rank 0); that folder "
            f"is not shared (not seen from {view.where()}), so checkpoints written where an earlier job's rank 0 "
            "ran are not seen here: starting from step 0; put train.checkpoint_dir on a shared folder")
