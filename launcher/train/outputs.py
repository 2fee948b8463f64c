"""What rank 0 leaves in the run folder besides per-step metrics: the config and summary as JSON, the
merged trace of all ranks; and ``{output_dir}`` placed into trace paths so traces live with the run."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, Optional

from lmsdp.comm import merge_traces
from lmsdp.runtime import run_folder
from lmsdp.runtime.new_file import open_new
from lmsdp.swapping import SwapEngine

from lmsdp.launcher.config import Config


def paths_in_output_dir(config: Config) -> Config:
    """``{output_dir}`` in swap.trace / comm.timeline becomes the run's output directory, so a run's
    traces live with its metrics (and ``lmsrun report RUN_DIR`` finds them)."""
    def place(path: Optional[str]) -> Optional[str]:
        return path.replace("{output_dir}", config.output_dir) if path else path
    return dataclasses.replace(
        config, swap=dataclasses.replace(config.swap, trace=place(config.swap.trace)),
        comm=dataclasses.replace(config.comm, timeline=place(config.comm.timeline)))


def merge_rank_traces(config: Config, engine: SwapEngine, backend: Any) -> Optional[str]:
    """Rank 0 joins every rank's swap trace and allreduce timeline into ``<output_dir>/trace.json``:
    one process track per rank, compute / swap-out / swap-in / allreduce on one clock."""
    if not (config.swap.trace or config.comm.timeline):
        return None
    mine = [p for p in (engine.tracer.path if engine.tracer else None, backend.trace_path) if p]
    every = backend.allgather_object(mine)  # also the barrier: every rank has written its trace
    if backend.rank != 0:
        return None
    out = os.path.join(config.output_dir, run_folder.TRACE)
    merge_traces([p for paths in every for p in paths if os.path.exists(p)], out)
    print(f"[lmsdp] trace of all ranks: {out} (open in https://ui.perfetto.dev or chrome://tracing)",
          file=sys.stderr, flush=True)
    return out


def engine_totals(engine: SwapEngine) -> Dict[str, Any]:
    """The swap engine's run totals for the summary, each key prefixed ``swap_``."""
    if not engine.config.enabled:
        return {}
    return {key if key.startswith("swap") else f"swap_{key}": value for key, value in engine.summary().items()
            if isinstance(value, (int, float)) and key != "steps"}


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Atomically (temp file, rename); NaN/inf become null: bare NaN is not JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open_new(tmp) as handle:  # a predictable name in the run folder: never through a planted link
        json.dump(_finite(data), handle, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
