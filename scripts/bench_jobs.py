"""One real ``lmsrun`` job for a benchmark: a config given entirely by ``--set`` items, run with N
ranks into ``out``, its rank-0 metrics back (one dict per step). Shared by the benchmarks that
compare whole jobs (bench_shard, bench_parallel); a failed job stops the benchmark naming it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")


def run_job(bench: str, label: str, out: str, np: int, sets: List[str], timeout: int = 900) -> List[dict]:
    """``lmsrun <job> -np N --output-dir OUT --set ...``; ``bench``/``label`` name it if it fails."""
    job = os.path.join(os.path.dirname(out), "job.yaml")
    with open(job, "w", encoding="utf-8") as handle:
        handle.write(f"name: {bench}\n")
    argv = [LMSRUN, job, "-np", str(np), "--output-dir", out]
    for item in sets:
        argv += ["--set", item]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{bench}: {label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.rank0.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
