"""What a person sees and what a program reads: the rank-0 progress bar (rich on a terminal, plain
lines otherwise), per-rank metrics JSONL, and the end-of-run summary table."""
from __future__ import annotations

import json
import math
import os
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
    sums: Dict[str, float] = {}
    for record in records:
        _accumulate(sums, record)
    return _collective_rows(sums)


def _accumulate(sums: Dict[str, float], record: Dict[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sums[key] = sums.get(key, 0) + value


def _collective_rows(sums: Dict[str, float]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for kind in STEP_COLLECTIVES:
        count = sums.get(f"{kind}_count", 0)
        if not count:
            continue
        out[f"{kind}_ms_total"] = sums.get(f"{kind}_ms", 0.0)
        out[f"{kind}_count_total"] = count
        out[f"{kind}_bytes_total"] = sums.get(f"{kind}_bytes", 0)
    return out


class LogHistogram:
    """Median of positive numbers in fixed memory: counts per bucket of ``resolution`` relative width
    (0.5%: the lower median to within 0.5%), however many values come."""

    def __init__(self, resolution: float = 0.005) -> None:
        self._log_base = math.log1p(resolution)
        self._counts: Dict[int, int] = {}
        self._n = 0

    def add(self, value: float) -> None:
        bucket = math.floor(math.log(value) / self._log_base) if value > 0 else -(1 << 30)
        self._counts[bucket] = self._counts.get(bucket, 0) + 1
        self._n += 1

    def median(self) -> float:
        seen = 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if 2 * seen >= self._n:
                return 0.0 if bucket == -(1 << 30) else math.exp((bucket + 0.5) * self._log_base)
        return 0.0


class RunSummary:
    """Folds step records on rank 0 into running totals (fixed memory, however long the run) and
    renders the end-of-run table (and summary.json). Medians and means are over the steady steps:
    all but the first, which pays warm-up (the first alone when it is the only one)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps_run = 0
        self._last: Dict[str, Any] = {}
        self._sums: Dict[str, float] = {}          # every numeric key over all steps
        self._steady: Dict[str, float] = {}        # over the steady steps
        self._step_time, self._throughput = LogHistogram(), LogHistogram()
        self._last_eval: Dict[str, Any] = {}

    def add(self, record: Dict[str, Any]) -> None:
        self.steps_run += 1
        if self.steps_run == 2:  # the first step was only steady while it was alone
            self._steady, self._step_time, self._throughput = {}, LogHistogram(), LogHistogram()
        _accumulate(self._sums, record)
        _accumulate(self._steady, record)
        self._step_time.add(record["step_time_s"])
        self._throughput.add(record["samples_per_s"])
        self._last = record
        if "eval_loss" in record:  # the run's last validation goes into the summary
            self._last_eval = {f"final_{k}": v for k, v in record.items() if k.startswith("eval_")}

    def totals(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        out: Dict[str, Any] = {"steps_run": self.steps_run, "wall_s": time.perf_counter() - self.started}
        if self.steps_run:
            steady_steps = max(1, self.steps_run - 1)
            out.update(
                last_step=self._last["step"], final_loss=self._last["loss"],
                step_time_median_s=self._step_time.median(), samples_per_s_median=self._throughput.median(),
            )
            # Swap totals come from the engine itself (RunSummary.totals' extra); comm from the records.
            if "allreduce_ms" in self._sums:
                out["allreduce_ms_total"] = self._sums["allreduce_ms"]
                out["allreduce_hidden_frac_mean"] = self._steady.get("allreduce_hidden_frac", 0.0) / steady_steps
            out.update(_collective_rows(self._sums))
            out.update(self._last_eval)
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
