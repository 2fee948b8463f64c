"""Rank 0's end-of-run table and summary.json under ``comm.strategy: shard`` carry the run's
all-gather and reduce-scatter totals, equal to the sums of rank 0's per-step metrics; runs without
those collectives get no such rows. A real 2-rank job (mpirun, gloo on CPU)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lmsdp.launcher.train.metrics import RunSummary, collective_totals
from lmsdp.swapping.units import format_size
from tests.test_shard import GPT, SHARD, lmsrun, metrics

KINDS = ("allgather", "reduce_scatter")


def _table_rows(log: str) -> dict:
    """metric -> value text of the rich table in rank 0's log ('│ key │ value │' rows)."""
    rows = {}
    for line in log.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_shard_run_summary_has_collective_totals(tmp_path: Path) -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    out = lmsrun(tmp_path / "gpt-shard", *GPT, *SHARD, steps=4)
    records = metrics(out, 0)
    summary = json.loads((out / "summary.json").read_text())
    rows = _table_rows((out / "rank0.log").read_text())
    for kind in KINDS:
        count = sum(r[f"{kind}_count"] for r in records)
        nbytes = sum(r[f"{kind}_bytes"] for r in records)
        ms = sum(r[f"{kind}_ms"] for r in records)
        assert count > 0 and nbytes > 0, kind
        assert summary[f"{kind}_count_total"] == count
        assert summary[f"{kind}_bytes_total"] == nbytes
        assert summary[f"{kind}_ms_total"] == pytest.approx(ms, rel=1e-9)
        assert rows[f"{kind}_count_total"] == str(count)
        assert rows[f"{kind}_bytes_total"] == format_size(nbytes)
        assert rows[f"{kind}_ms_total"] == f"{ms:.4g}"


def test_no_collective_rows_when_none_ran() -> None:
    replicate = [{"step": s, "loss": 1.0, "step_time_s": 0.1, "samples_per_s": 10.0, "allreduce_ms": 1.0}
                 for s in (1, 2)]
    zeros = [dict(r, allgather_ms=0.0, allgather_count=0, allgather_bytes=0) for r in replicate]
    for records in (replicate, zeros):
        summary = RunSummary()
        for record in records:
            summary.add(record)
        assert not [k for k in summary.totals() if k.startswith(KINDS)]
    only_gather = [dict(r, allgather_ms=0.5, allgather_count=3, allgather_bytes=100) for r in replicate]
    assert collective_totals(only_gather) == {"allgather_ms_total": 1.0, "allgather_count_total": 6,
                                              "allgather_bytes_total": 200}
