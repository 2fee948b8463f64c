"""What a person sees and what a program reads: the rank-0 progress bar (rich on a terminal, plain
lines otherwise), per-rank metrics JSONL, and the end-of-run summary table."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from lmsdp.runtime import env as envvars
from lmsdp.swapping.units import format_size
from lmsdp.runtime import run_folder


def on_terminal(stream: TextIO = sys.stderr) -> bool:
    """True on a real terminal, or when the launcher says the user's terminal is behind mpirun."""
    return envvars.flag(envvars.TTY) or (hasattr(stream, "isatty") and stream.isatty())


class MetricsWriter:
    """One JSON object per step in ``metrics.rank<R>.jsonl``. A resumed run keeps the records up to
    the step it resumed from and drops later ones (they belong to steps that are being redone)."""

    def __init__(self, output_dir: str, rank: int, resumed_at: int = 0) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = run_folder.metrics_file(output_dir, rank)
        kept = _records_up_to(self.path, resumed_at) if resumed_at else []
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.writelines(kept)

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _records_up_to(path: str, step: int) -> List[str]:
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    return kept


class Progress:
    """Rank 0's progress: a live rich bar on a terminal, a log line every ``log_every`` steps otherwise."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool, title: str) -> None:
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self._bar = None
        if enabled and on_terminal():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            console = Console(stderr=True, force_terminal=True)
            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console)
            self._task = self._bar.add_task(title, total=total, completed=start, info="")
            self._bar.start()

    def update(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  {record['samples_per_s']:.1f} samples/s"
        if record.get("swap_out_bytes"):
            info += f"  swap {format_size(record['swap_out_bytes'])}/step"
        step = record["step"]
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.total:
            print(f"[lmsdp] step {step}/{self.total}  {info}  {record['step_time_s'] * 1000:.0f} ms/step",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# Collectives a strategy times per step (comm.strategy: shard's all-gather and reduce-scatter):
# each step record holds <kind>_ms, <kind>_count and <kind>_bytes.
STEP_COLLECTIVES = ("allgather", "reduce_scatter")


def collective_totals(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``<kind>_ms_total``, ``_count_total`` and ``_bytes_total`` over the run for each collective
    some step actually ran (none under replicate, where the keys are absent or zero)."""
    out: Dict[str, Any] = {}
    for kind in STEP_COLLECTIVES:
        count = sum(r.get(f"{kind}_count", 0) for r in records)
        if not count:
            continue
        out[f"{kind}_ms_total"] = sum(r.get(f"{kind}_ms", 0.0) for r in records)
        out[f"{kind}_count_total"] = count
        out[f"{kind}_bytes_total"] = sum(r.get(f"{kind}_bytes", 0) for r in records)
    return out


class RunSummary:
    """Collects step records on rank 0 and renders the end-of-run table (and summary.json)."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.started = time.perf_counter()

    def add(self, record: Dict[str, Any]) -> None:
        self.records.append(record)

    def totals(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        recs = self.records
        steady = recs[1:] or recs  # the first step pays warm-up
        out: Dict[str, Any] = {"steps_run": len(recs), "wall_s": time.perf_counter() - self.started}
        if recs:
            out.update(
                last_step=recs[-1]["step"], final_loss=recs[-1]["loss"],
                step_time_median_s=statistics.median(r["step_time_s"] for r in steady),
                samples_per_s_median=statistics.median(r["samples_per_s"] for r in steady),
            )
            # Swap totals come from the engine itself (RunSummary.totals' extra); comm from the records.
            if any("allreduce_ms" in r for r in recs):
                out["allreduce_ms_total"] = sum(r.get("allreduce_ms", 0) for r in recs)
                out["allreduce_hidden_frac_mean"] = statistics.fmean(r.get("allreduce_hidden_frac", 0.0)
                                                                     for r in steady)
            out.update(collective_totals(recs))
        out.update(extra or {})
        return out

    def render(self, totals: Dict[str, Any], stream: TextIO = sys.stderr) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="lmsdp run summary", show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in totals.items():
            if key.endswith("bytes") or key.endswith("bytes_total"):
                text = format_size(value)
            elif isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = str(value)
            table.add_row(key, text)
        Console(file=stream, force_terminal=False, width=100).print(table)
