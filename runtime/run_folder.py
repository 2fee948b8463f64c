"""What a run leaves in its output folder (``train.output_dir``), named in one place: every writer
(lmsrun's demux, each rank) and every reader (``lmsrun report``, ``tune``, ``export``) asks here."""
from __future__ import annotations

import os
import re

CONFIG = "config.json"              # the resolved config, rank 0
SUMMARY = "summary.json"            # the end-of-run table, rank 0
TRACE = "trace.json"                # every rank's swap trace and comm timeline merged, rank 0
THREADS_PLAN = "threads_plan.json"  # launch.threads: auto's per-module choice, rank 0
CHECKPOINTS = "checkpoints"         # default train.checkpoint_dir
ERRORS = "errors"                   # rank<R>.json error files kept after a failed job
SHARED_TOKEN = ".lmsdp-shared"      # rank 0's token: does every host see this folder? (runtime/shared_folder.py)
LAUNCHER_MARK = ".lmsdp-launcher"   # lmsrun's mark: does lmsrun's host see what rank 0 writes?
METRICS_GLOB = "metrics.rank*.jsonl"
METRICS_RE = re.compile(r"metrics\.rank(\d+)\.jsonl$")


def metrics_file(output_dir: str, rank: int) -> str:
    """One JSON record per step of ``rank``."""
    return os.path.join(output_dir, f"metrics.rank{rank}.jsonl")


def rank_log(output_dir: str, rank: int) -> str:
    """Everything ``rank`` printed (``--output-dir``)."""
    return os.path.join(output_dir, f"rank{rank}.log")
