"""``lmsrun export RUN_DIR [-o model.pt] [--step N]``: one consolidated ``model.pt`` (a plain
``state_dict`` for ``model.load_state_dict``) from a run's newest checkpoint, sharded (a DCP folder
written by ``strategy: shard``, read in one process without a process group) or not (``step-N.pt``).
Written atomically (temp file, rename)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from lmsdp.launcher.config.errors import UserError
from lmsdp.runtime import run_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmsrun export", allow_abbrev=False,
                                     description="Write one consolidated model.pt from a run's checkpoint.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (or its checkpoints folder)")
    parser.add_argument("-o", "--output", metavar="PATH", help="where model.pt goes (default: RUN_DIR/model.pt)")
    parser.add_argument("--step", type=int, metavar="N", help="export step N instead of the newest")
    return parser


def find_checkpoints(run_dir: str) -> Tuple[str, List[Tuple[int, str]]]:
    """(checkpoint folder, [(step, path)] newest first, sharded folders and .pt files together)."""
    from lmsdp.launcher.train.checkpoint import CheckpointManager
    from lmsdp.launcher.train.checkpoint_sharded import sharded_candidates

    for directory in (os.path.join(run_dir, run_folder.CHECKPOINTS), run_dir):
        found = sorted(sharded_candidates(directory) + CheckpointManager(directory).candidates(), reverse=True)
        if found:
            return directory, found
    raise UserError(f"RUN_DIR: no checkpoint (step-N.pt or sharded step-N/) in {run_dir} or "
                    f"{os.path.join(run_dir, 'checkpoints')}", hint="is it a run's output_dir?")


def load_model_state(path: str) -> Dict[str, Any]:
    """The full model state dict of one checkpoint; a sharded one is consolidated in this process."""
    import torch

    if os.path.isdir(path):
        from lmsdp.launcher.train.checkpoint_sharded import read_full

        try:  # the model only: the optimizer state (2x the weights for Adam) is never read
            return dict(read_full(path, ("model",))["model"])
        except ValueError as exc:
            raise UserError(f"RUN_DIR: {exc}") from None
    return dict(torch.load(path, map_location="cpu", weights_only=False)["model"])


def export(run_dir: str, output: Optional[str] = None, step: Optional[int] = None) -> Tuple[str, str]:
    """Write the consolidated model state; returns (checkpoint used, file written)."""
    import torch

    if not os.path.isdir(run_dir):
        raise UserError(f"RUN_DIR: not a folder: {run_dir}")
    _, found = find_checkpoints(run_dir)
    if step is not None:
        found = [(s, p) for s, p in found if s == step]
        if not found:
            raise UserError(f"--step: no checkpoint of step {step} in {run_dir}")
    source = found[0][1]
    state = load_model_state(source)
    output = output or os.path.join(run_dir, "model.pt")
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return source, output


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    source, output = export(args.run_dir, args.output, args.step)
    print(f"[lmsdp] exported {source} -> {output}", file=sys.stderr, flush=True)
    return 0
