"""The flags of ``lmsrun`` itself (launch, run and swap groups): the front door parses them, and
``lmsrun tune`` parses each trial's flags the same way so a trial is exactly what a user would start."""
from __future__ import annotations

import argparse
import math
from typing import Any

from lmsdp.swapping.registry import TRANSPORTS

from lmsdp.launcher.config.argtypes import OneLineParser, nonneg_int, positive_float, positive_int


def build_parser(epilog: str = "") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmsrun", allow_abbrev=False,
        usage="lmsrun [CONFIG] [-np N] [-H HOSTS | --hostfile F] [options] [-- COMMAND ...]",
        description="Data-parallel training with large model support: one MPI rank per GPU. "
                    "With '-- COMMAND', runs your own script (e.g. a Horovod one) under the same launch.",
        epilog=epilog, formatter_class=_ListsAsWritten)
    parser.add_argument("config", nargs="?", help="YAML config file (optional in script mode)")
    launch = parser.add_argument_group("launch (override the config's launch: section; as in horovodrun)")
    launch.add_argument("-np", "--num-proc", dest="np", type=positive_int, metavar="N",
                        help="number of ranks, one per GPU (default: launch.np, or 1)")
    launch.add_argument("-H", "--hosts", metavar="HOST:SLOTS,..", help="hosts and their slots, e.g. n1:4,n2:4")
    launch.add_argument("--hostfile", metavar="FILE", help="Open MPI / horovodrun hostfile ('host slots=N')")
    launch.add_argument("--mpi-args", metavar="ARGS", help="extra mpirun arguments, passed verbatim")
    launch.add_argument("--oversubscribe", action="store_true", default=None,
                        help="allow more ranks than cores (added anyway when ranks exceed local cores)")
    launch.add_argument("--threads", type=_threads, metavar="N|auto",
                        help="intra-op threads per rank (0: cores / ranks; auto: measured per module)")
    launch.add_argument("--dry-run", action="store_true", help="print the command and the resolved config, run nothing")
    launch.add_argument("--stop-timeout", type=_seconds, default=120.0, metavar="S",
                        help="after SIGINT/SIGTERM, seconds the ranks get to checkpoint before being killed")
    launch.add_argument("-v", "--verbose", action="store_true", help="show mpirun's own messages as they come")
    run = parser.add_argument_group("run")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set swap.threshold=1MiB (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    run.add_argument("--output-dir", metavar="DIR", help="train.output_dir, and rank<R>.log files of each rank's output")
    swap = parser.add_argument_group("swap engine (config mode: swap.*; script mode: LMSDP_SWAP_* for every rank)")
    swap.add_argument("--swap-threshold", metavar="SIZE", help="smallest saved tensor swapped, e.g. 1MiB")
    swap.add_argument("--swap-prefetch", type=nonneg_int, metavar="N", help="swap-ins started ahead")
    swap.add_argument("--swap-keep-last", type=nonneg_int, metavar="K", help="last K saved tensors never swapped")
    swap.add_argument("--swap-budget", metavar="SIZE", help="saved bytes kept on the device before swapping")
    swap.add_argument("--swap-host-limit", metavar="SIZE", help="cap on pinned host memory")
    swap.add_argument("--swap-recompute", metavar="KINDS", help="'auto' or a comma list, e.g. relu,batchnorm")
    swap.add_argument("--swap-transport", choices=TRANSPORTS.choices(), help="swap transport")
    swap.add_argument("--swap-link-gbps", type=positive_float, metavar="GBPS",
                      help="loopback transport only: pace its copies to GBPS GB/s (a simulated link)")
    swap.add_argument("--swap-disk-dir", metavar="DIR", help="a local folder: a disk tier below host memory")
    swap.add_argument("--swap-disk-limit", metavar="SIZE", help="cap on spilled bytes per rank in --swap-disk-dir")
    return parser


class _ListsAsWritten(argparse.HelpFormatter):
    """Wraps one-paragraph texts (the description) but prints texts of several lines (the subcommand
    list in the epilog) as written, so its columns stay aligned."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _threads(text: str) -> Any:
    return "auto" if text == "auto" else nonneg_int(text)

