"""Soak (memory only, never timed): 2,000 steps of a tiny model on one rank, in place, with every
trace on (the quickstart's swap.trace and comm.timeline, Horovod's own timeline where Horovod is the
backend). The rank's resident memory, from its own per-step ``rss_bytes``, stays flat after warm-up,
and the trace files hold the scheduled windows only: their size does not grow with the step count."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from lmsdp.runtime.chrome_trace import load_trace

REPO = Path(__file__).resolve().parents[1]
LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
TINY = ["model.name=gpt", "model.kwargs={vocab: 64, seq_len: 16, layers: 2, width: 32, heads: 4}",
        "data.shape=null", "data.classes=null", "train.batch_size=4", "swap.threshold=0", "swap.keep_last=0",
        "swap.transport=loopback", "train.checkpoint_every=0", "train.progress=false", "launch.threads=1",
        "train.trace_steps=[10,12]", "train.trace_every=500"]
SOAK_STEPS, WARM_UP = 2000, 200
MAX_SLOPE = 2048  # bytes per step; a leak of the size issue 29 found was ~95 KB per step


def soak_run(out: Path, steps: int) -> List[Dict]:
    """One in-place rank of the quickstart made tiny, every trace on; its metrics records."""
    args = [LMSRUN, "configs/quickstart.yaml", "-np", "1", "--output-dir", str(out)]
    for item in TINY + [f"train.steps={steps}"]:
        args += ["--set", item]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.rank0.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def trace_files(out: Path) -> Dict[str, int]:
    """Every per-rank trace file and its size (the merged trace.json is their sum, left out)."""
    names = {p for pattern in ("*trace*.json", "*timeline*.json") for p in glob.glob(str(out / pattern))}
    return {os.path.basename(p): os.path.getsize(p) for p in names if os.path.basename(p) != "trace.json"}


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_two_thousand_traced_steps_keep_memory_flat_and_traces_to_their_windows(tmp_path: Path) -> None:
    records = soak_run(tmp_path / "soak", SOAK_STEPS)
    assert [r["step"] for r in records] == list(range(1, SOAK_STEPS + 1))  # every step's metrics kept
    steady = [r for r in records if r["step"] >= WARM_UP]
    slope = np.polyfit([r["step"] for r in steady], [r["rss_bytes"] for r in steady], 1)[0]
    assert slope < MAX_SLOPE, f"RSS grows {slope:.0f} bytes per step from step {WARM_UP} on"

    summary = json.loads((tmp_path / "soak" / "summary.json").read_text())
    assert summary["rss_peak_bytes"] == max(r["rss_bytes"] for r in records)
    assert summary["traced_steps"] == "steps 10-12, then 3 every 500"
    swap = load_trace(str(tmp_path / "soak" / "swap_trace.json"))
    traced = {ev["args"]["step"] for ev in swap if ev["ph"] == "X"}
    assert traced == {s for first in (10, 510, 1010, 1510) for s in range(first, first + 3)}

    # the same windows from a 20-step run: four windows cost at most four times one, whatever the length
    soak_run(tmp_path / "short", 20)
    long, short = trace_files(tmp_path / "soak"), trace_files(tmp_path / "short")
    assert set(long) == set(short) and "swap_trace.json" in long and "comm_timeline.json" in long
    assert sum(long.values()) <= 4 * 1.25 * sum(short.values()), (long, short)
