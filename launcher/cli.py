"""``lmsrun``: parse flags, load the config, run. (The multi-rank launch is built on top of this.)"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import load_config
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmsrun", description="Data-parallel training with large model support.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set swap.threshold=1MiB (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        config = load_config(args.config, overrides)
        from .worker import run_worker

        return run_worker(config)
    except UserError as exc:
        print(f"lmsrun: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
