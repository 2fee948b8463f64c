"""Every ``LMSDP_*`` environment variable lmsdp reads or sets, each with one line of what it does.

Code names a variable through these constants (never a string literal elsewhere), and the README's
table is generated from ``VARIABLES`` (``scripts/config_reference.py``); a test fails when a
``LMSDP_*`` name appears in the sources without an entry here."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from .trace_schedule import DEFAULT_STEPS


@dataclass(frozen=True)
class Variable:
    name: str
    who: str   # who sets it: "you" (a user knob), "lmsrun" (set for the ranks), "setup" (scripts/setup.sh)
    doc: str


_ALL = [
    # set by users
    Variable("LMSDP_MPIRUN", "you", "path of the MPI launcher lmsrun starts (default: mpirun, else mpiexec, on PATH)"),
    Variable("LMSDP_MASTER_ADDR", "you", "address advertised for rank 0's store (torch backend under MPI), e.g. "
                                         "behind a NAT; the store still listens only on comm.interface's address "
                                         "(default: that address)"),
    Variable("LMSDP_SWAP", "lmsrun", "script mode: 1 switches the swap engine on in every rank (through the sitecustomize)"),
    Variable("LMSDP_SWAP_THRESHOLD", "lmsrun", "script mode: swap.threshold (--swap-threshold)"),
    Variable("LMSDP_SWAP_PREFETCH", "lmsrun", "script mode: swap.prefetch (--swap-prefetch)"),
    Variable("LMSDP_SWAP_KEEP_LAST", "lmsrun", "script mode: swap.keep_last (--swap-keep-last)"),
    Variable("LMSDP_SWAP_BUDGET", "lmsrun", "script mode: swap.budget (--swap-budget)"),
    Variable("LMSDP_SWAP_HOST_LIMIT", "lmsrun", "script mode: swap.host_limit (--swap-host-limit)"),
    Variable("LMSDP_SWAP_RECOMPUTE", "lmsrun", "script mode: swap.recompute, 'auto' or a comma list (--swap-recompute)"),
    Variable("LMSDP_SWAP_TRANSPORT", "lmsrun", "script mode: swap.transport (--swap-transport)"),
    Variable("LMSDP_SWAP_DISK_DIR", "lmsrun", "script mode: swap.disk_dir, a disk tier below host memory (--swap-disk-dir)"),
    Variable("LMSDP_SWAP_DISK_LIMIT", "lmsrun", "script mode: swap.disk_limit (--swap-disk-limit)"),
    Variable("LMSDP_SWAP_LINK_GBPS", "lmsrun", "script mode: swap.link_gbps, the loopback transport's simulated link (--swap-link-gbps)"),
    Variable("LMSDP_SWAP_TRACE", "you", "script mode: swap.trace, chrome-trace path ({rank} is replaced) of steps "
             + f"{DEFAULT_STEPS[0]}-{DEFAULT_STEPS[1]} (the default window)"),
    # set by lmsrun for its ranks
    Variable("LMSDP_LAUNCHED", "lmsrun", "1 in ranks started by lmsrun: a rank without MPI variables is an error, "
                                         "and a rank stopped by a signal exits 0 (lmsrun returns 128+signal)"),
    Variable("LMSDP_EXPECTED_NP", "lmsrun", "ranks the job was meant to have (lmsrun, sbatch scripts); a launcher "
                                            "that started another number is a one-line error, not a hang"),
    Variable("LMSDP_TTY", "lmsrun", "1 when lmsrun's stderr is a terminal: rank 0 draws the progress bar although "
                                    "mpirun hands it a pipe"),
    Variable("LMSDP_ERROR_DIR", "lmsrun", "folder where a failing rank writes rank<R>.json (type, message, "
                                          "traceback, time); lmsrun reports the earliest and keeps them in "
                                          "<output_dir>/errors/ when the job fails"),
    Variable("LMSDP_LAUNCHER", "lmsrun", "the lmsrun process as PID:START@HOST: ranks on that host end themselves "
                                         "within a second when it is gone (no headless job)"),
    # read by scripts/setup.sh
    Variable("LMSDP_VENV", "setup", "virtual environment scripts/setup.sh creates and fills (default: .venv)"),
    Variable("LMSDP_TORCH_SPEC", "setup", "torch requirement installed when the venv has none (default: torch==2.13.0)"),
    Variable("LMSDP_WHEEL_CACHE", "setup", "where the Horovod wheel built once is kept (default: ~/.cache/lmsdp/wheels)"),
    Variable("LMSDP_SKIP_APT", "setup", "1: do not install Debian packages"),
    Variable("LMSDP_SKIP_HOROVOD", "setup", "1: do not build or install Horovod"),
]
VARIABLES: Dict[str, Variable] = {v.name: v for v in _ALL}

MPIRUN = "LMSDP_MPIRUN"
MASTER_ADDR = "LMSDP_MASTER_ADDR"
SWAP = "LMSDP_SWAP"
SWAP_TRACE = "LMSDP_SWAP_TRACE"
LAUNCHED = "LMSDP_LAUNCHED"
EXPECTED_NP = "LMSDP_EXPECTED_NP"
TTY = "LMSDP_TTY"
ERROR_DIR = "LMSDP_ERROR_DIR"
LAUNCHER = "LMSDP_LAUNCHER"


def read(name: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The value of a registered variable (None when unset)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a registered lmsdp variable (add it to lmsdp.runtime.env)")
    return (os.environ if env is None else env).get(name)


def flag(name: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """A registered on/off variable: 1, true, yes or on (any case) mean on."""
    return (read(name, env) or "0").strip().lower() in ("1", "true", "yes", "on")
