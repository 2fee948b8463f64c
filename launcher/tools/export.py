"""``lmsrun export RUN_DIR [-o model.pt] [--step N]``: one consolidated ``model.pt`` (a plain
``state_dict`` for ``model.load_state_dict``) from a run's newest checkpoint, sharded (a DCP folder
written by ``strategy: shard``, read in one process without a process group) or not (``step-N.pt``).
Written atomically (temp file, rename).

Nothing read runs code (launcher/train/checkpoint_trust.py): a checkpoint that would is refused in one line.
``lmsrun export --trust FILE`` converts one such file the user vouches for (an older lmsdp's
``step-N.pt``, or a sharded folder's ``lmsdp.pt``): loaded with full pickle -- its code runs, so the
flag names the one file trusted -- and rewritten in place as tensors and plain data, so ``--resume``
and ``export`` read it safely from then on."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from lmsdp.launcher.config.argtypes import OneLineParser
from lmsdp.launcher.config.errors import UserError
from lmsdp.runtime import run_folder


def build_parser() -> argparse.ArgumentParser:
    from lmsdp.launcher.train.checkpoint_trust import TRUST_FLAG  # here: torch loads only when export runs

    parser = OneLineParser(prog="lmsrun export", allow_abbrev=False,
                                     description="Write one consolidated model.pt from a run's checkpoint.")
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="the run's output folder (or its checkpoints folder)")
    parser.add_argument("-o", "--output", metavar="PATH", help="where model.pt goes (default: RUN_DIR/model.pt)")
    parser.add_argument("--step", type=int, metavar="N", help="export step N instead of the newest")
    parser.add_argument(TRUST_FLAG, metavar="FILE", dest="trust",
                        help="convert FILE (a checkpoint lmsdp refuses because loading it could run code) in "
                             "place to tensors and plain data; loading it runs its code: only for a file you trust")
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
    from lmsdp.launcher.train.checkpoint_trust import load_weights_only

    if os.path.isdir(path):
        from lmsdp.launcher.train.checkpoint_sharded import read_full

        try:  # the model only: the optimizer state (2x the weights for Adam) is never read
            return dict(read_full(path, ("model",))["model"])
        except ValueError as exc:
            raise UserError(f"RUN_DIR: {exc}") from None
    state = load_weights_only(path, path)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"RUN_DIR: {path} is not an lmsdp checkpoint (no 'model' state)")
    return dict(state["model"])


def export(run_dir: str, output: Optional[str] = None, step: Optional[int] = None) -> Tuple[str, str]:
    """Write the consolidated model state; returns (checkpoint used, file written)."""
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
    _write_atomically(state, output)
    return source, output


def convert_trusted(path: str) -> str:
    """Rewrite the checkpoint ``path`` (``step-N.pt``, or a sharded ``step-N/`` folder's ``lmsdp.pt``)
    as tensors and plain data, loading it with full pickle: its code runs. Returns the file rewritten."""
    import torch

    from lmsdp.launcher.train.checkpoint import CheckpointManager
    from lmsdp.launcher.train.checkpoint_sharded import META
    from lmsdp.launcher.train.checkpoint_trust import make_plain

    target = os.path.join(path, META) if os.path.isdir(path) else path
    whole_checkpoint = os.path.basename(target) != META  # a step-N.pt, not a sharded folder's lmsdp.pt
    if not os.path.isfile(target):
        raise UserError(f"--trust: no checkpoint file at {target}", hint="give a step-N.pt or a sharded step-N/ folder")
    try:
        state = torch.load(target, map_location="cpu", weights_only=False)  # trusted by the user, by name
    except Exception as exc:  # noqa: BLE001 - not a torch file at all
        raise UserError(f"--trust: {target} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"--trust: {target} is not an lmsdp checkpoint (a {type(state).__name__}, not a dict)")
    plain = make_plain(state, os.path.basename(target))
    if whole_checkpoint:  # atomically, with a new digest
        CheckpointManager(os.path.dirname(os.path.abspath(path))).write(path, plain)
    else:
        _write_atomically(plain, target)
    return target


def _write_atomically(state: Dict[str, Any], output: str) -> None:
    import torch

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


def main(argv: List[str]) -> int:
    from lmsdp.launcher.train.checkpoint_trust import TRUST_FLAG

    args = build_parser().parse_args(argv)
    if args.run_dir is None and args.trust is None:
        raise UserError(f"RUN_DIR: missing; give a run's output folder (or {TRUST_FLAG} FILE to convert a checkpoint)")
    if args.trust is not None:
        converted = convert_trusted(args.trust)
        print(f"[lmsdp] converted {converted}: tensors and plain data only, it now loads without running code",
              file=sys.stderr, flush=True)
        if args.run_dir is None:
            return 0
    source, output = export(args.run_dir, args.output, args.step)
    print(f"[lmsdp] exported {source} -> {output}", file=sys.stderr, flush=True)
    return 0
