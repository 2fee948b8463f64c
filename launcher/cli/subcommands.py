"""``lmsrun``'s subcommands, by name: the one table that ``lmsrun`` dispatches from and that
``lmsrun --help`` lists. Each target is a module's ``main(argv) -> int``, imported only when its
subcommand runs (``lmsrun train.yaml`` never pays for the report's plotting imports).

A first word that is neither a subcommand nor an existing file but is close to a subcommand's name
(``lmsrun tnue x.yaml``) is a typo: one line with a did-you-mean instead of "config not found"."""
from __future__ import annotations

import difflib
import os
from typing import List, Optional

from lmsdp.runtime.registry import Registry

from lmsdp.launcher.config.errors import UserError

SUBCOMMANDS = Registry("lmsrun subcommand")
SUBCOMMANDS.register("plan", "lmsdp.launcher.tools.plan:main",
                     "predict peak memory and step time; choose what to keep, swap or recompute")
SUBCOMMANDS.register("tune", "lmsdp.launcher.tools.tune:main",
                     "short trial runs choose ranks, threads, batch and binding; --write a tuned config")
SUBCOMMANDS.register("report", "lmsdp.launcher.tools.report:main",
                     "plots and an HTML page of one or more finished runs")
SUBCOMMANDS.register("export", "lmsdp.launcher.tools.export:main",
                     "one consolidated model.pt from a run's (sharded) checkpoint")
SUBCOMMANDS.register("data", "lmsdp.launcher.tools.data:main",
                     "make data files: a byte-level token file from text (lmsrun data tokens PATH --out FILE)")
SUBCOMMANDS.register("slurm", "lmsdp.launcher.tools.slurm:main",
                     "write (or submit) an sbatch script for a config")


def epilog() -> str:
    """The subcommand list for ``lmsrun --help`` (argparse prints it verbatim: RawDescription)."""
    names = SUBCOMMANDS.names()
    width = max(len(name) for name in names)
    lines = [f"subcommands (lmsrun {{{','.join(names)}}} ... ; each has its own --help):"]
    lines += [f"  {entry.name.ljust(width)}  {entry.doc}" for entry in SUBCOMMANDS.entries()]
    return "\n".join(lines)


def dispatch(argv: List[str]) -> Optional[int]:
    """Run the subcommand ``argv[0]`` names and return its exit code; None when ``argv[0]`` is no
    subcommand (the caller goes on with config or script mode). A typo raises UserError."""
    if not argv:
        return None
    word = argv[0]
    if word in SUBCOMMANDS.names():
        return int(SUBCOMMANDS.get(word).load()(argv[1:]))
    guess = typo_of(word)
    if guess is not None:
        raise UserError(f"{word}: no such subcommand or file (did you mean 'lmsrun {guess}'?); "
                        f"subcommands: {', '.join(SUBCOMMANDS.names())}")
    return None


def typo_of(word: str) -> Optional[str]:
    """The subcommand ``word`` probably misspells, when it looks like a name and is not a file."""
    if word.startswith("-") or os.path.exists(word) or not word.isalpha():
        return None  # a flag, a config path (x.yaml, runs/a), or an existing file: not ours to judge
    close = difflib.get_close_matches(word.lower(), SUBCOMMANDS.names(), n=1, cutoff=0.6)
    return close[0] if close else None
