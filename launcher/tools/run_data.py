"""A finished run's files read back: ``metrics.rank<R>.jsonl`` (one record per step and rank),
``summary.json`` and ``config.json`` (rank 0), and the traces, tolerating what a killed run leaves (a
cut-off JSONL line, no summary, no merged trace): each problem is one warning and the rest is used.
``Run`` is what the report and the plots both read."""
from __future__ import annotations

import glob
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from lmsdp.launcher.config.errors import UserError
from lmsdp.runtime import run_folder

Warn = Callable[[str], None]
TRACE_GLOBS = ("*trace*.json", "*timeline*.json")  # per-rank traces when trace.json was never merged


@dataclass
class Run:
    """Everything readable about one run."""

    path: str
    config: Dict[str, Any] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[int, List[Dict[str, Any]]] = field(default_factory=dict)  # rank -> records by step
    trace: List[Dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def name(self) -> str:
        return str(self.config.get("name") or os.path.basename(os.path.normpath(self.path)))

    @property
    def model(self) -> str:
        model = self.config.get("model") or {}
        return str(model.get("factory") or model.get("name") or "?")

    @property
    def ranks(self) -> int:
        return int(self.summary.get("ranks") or len(self.metrics) or 1)

    def describe(self) -> str:
        """One line saying what the run was: model, ranks, backend, swap settings, batch."""
        parts = [f"{self.model}", f"{self.ranks} rank{'s' if self.ranks != 1 else ''}"]
        if self.summary.get("comm_backend"):
            parts[-1] += f" ({self.summary['comm_backend']})"
        batch = (self.config.get("train") or {}).get("batch_size")
        if batch:
            parts.append(f"batch {batch}/rank")
        swap = self.config.get("swap") or {}
        if swap.get("enabled"):
            parts.append(f"swap threshold {size_text(swap.get('threshold'))}, budget {size_text(swap.get('budget'))}, "
                         f"prefetch {swap.get('prefetch')}, keep_last {swap.get('keep_last')}")
            if swap.get("disk_dir"):
                parts.append(f"disk tier below host_limit {size_text(swap.get('host_limit'))}")
        elif swap:
            parts.append("swap off")
        return ", ".join(parts)


def size_text(value: Any) -> str:
    from lmsdp.swapping.units import format_size  # noqa: PLC0415 - keeps `lmsrun report --help` light

    return format_size(int(value)) if isinstance(value, (int, float)) else str(value)


# ------------------------------------------------------------------------------------------ loading
def load_run(path: str, warn: Warn) -> Run:
    """Load one run directory; raises UserError when it holds no run at all."""
    if not os.path.isdir(path):
        raise UserError(f"RUN_DIR: {path} is not a directory; give a run's train.output_dir, e.g. runs/quickstart")
    run = Run(path=path)
    for metrics_path in sorted(glob.glob(os.path.join(path, run_folder.METRICS_GLOB))):
        match = run_folder.METRICS_RE.search(metrics_path)
        if match:
            run.metrics[int(match.group(1))] = read_jsonl(metrics_path, warn)
    run.summary = _read_json(os.path.join(path, run_folder.SUMMARY), warn) or {}
    run.config = _read_json(os.path.join(path, run_folder.CONFIG), warn) or {}
    if not run.metrics and not run.summary:
        raise UserError(f"RUN_DIR: {path} holds no run (no metrics.rank<R>.jsonl, no summary.json); "
                        "give a run's train.output_dir, e.g. runs/quickstart")
    if not run.summary:
        warn(f"{path}: no summary.json (the run did not finish?); figures come from the metrics")
        run.summary = summary_from_metrics(run.metrics)
    run.trace = load_traces(path, warn)
    return run


def read_jsonl(path: str, warn: Warn) -> List[Dict[str, Any]]:
    """Records of a metrics file; unreadable lines (cut short by a kill) are skipped with a warning."""
    records: Dict[int, Dict[str, Any]] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[int(record["step"])] = record  # a resumed run rewrites steps: the last one wins
            except (ValueError, KeyError, TypeError):
                warn(f"{path}:{number}: unreadable line skipped (cut short when the run was killed?)")
    return [records[s] for s in sorted(records)]


def _read_json(path: str, warn: Warn) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError) as exc:
        warn(f"{path}: unreadable ({exc.__class__.__name__}); skipped")
        return None


def load_traces(path: str, warn: Warn) -> List[Dict[str, Any]]:
    """The merged ``trace.json``, else every per-rank trace in the directory (a run killed before
    rank 0 merged them); unclosed or cut-off files are read as far as they go."""
    merged = os.path.join(path, run_folder.TRACE)
    files = [merged] if os.path.exists(merged) else sorted(
        {f for pattern in TRACE_GLOBS for f in glob.glob(os.path.join(path, pattern))})
    events: List[Dict[str, Any]] = []
    for trace_path in files:
        events.extend(_read_trace(trace_path, warn))
    return events


def _read_trace(path: str, warn: Warn) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read().strip()
    try:
        if text.startswith("{"):
            return list(json.loads(text).get("traceEvents", []))
        return list(json.loads(text if text.endswith("]") else text.rstrip(",\n ") + "]"))
    except ValueError:
        pass
    # cut off mid-event: keep the complete events (one per line in the comm backends' trace)
    events = []
    for line in text.lstrip("[").splitlines():
        try:
            events.append(json.loads(line.strip().rstrip(",")))
        except ValueError:
            continue
    warn(f"{path}: trace cut short; {len(events)} complete events read")
    return events


def summary_from_metrics(metrics: Dict[int, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """The headline figures of summary.json, recomputed from rank 0's records (a killed run)."""
    records = metrics.get(0) or next(iter(metrics.values()), [])
    if not records:
        return {"ranks": len(metrics)}
    steady = records[1:] or records
    out: Dict[str, Any] = {
        "steps_run": len(records), "last_step": records[-1]["step"], "final_loss": records[-1].get("loss"),
        "step_time_median_s": statistics.median(r.get("step_time_s", 0.0) for r in steady),
        "samples_per_s_median": statistics.median(r.get("samples_per_s", 0.0) for r in steady),
        "ranks": len(metrics)}
    for key in ("swap_out_bytes", "stall_ms", "allreduce_ms"):
        if any(key in r for r in records):
            out[f"{key}_total"] = sum(r.get(key, 0) for r in records)
    return out


def label_runs(runs: List[Run]) -> None:
    """Short unique labels: the config name, with the directory name where names repeat."""
    names = [r.name for r in runs]
    for run in runs:
        base = os.path.basename(os.path.normpath(run.path))
        run.label = run.name if names.count(run.name) == 1 else (base if base != run.name else run.path)


def check_comparable(runs: List[Run], warn: Warn) -> None:
    """Runs of different models are still drawn side by side; say so once."""
    models = {r.model for r in runs}
    if len(models) > 1:
        warn("runs are of different models (" + ", ".join(f"{r.label}: {r.model}" for r in runs)
             + "); curves are overlaid by step, compare with care")


def traced_steps(events: List[Dict[str, Any]]) -> List[int]:
    """The steps the traces hold: those with a forward span (the swap engine's compute lane)."""
    return sorted({int(ev["args"]["step"]) for ev in events if ev.get("ph") == "X" and ev.get("name") == "forward"
                   and isinstance(ev.get("args"), dict) and isinstance(ev["args"].get("step"), int)})


def step_ranges(steps: List[int]) -> str:
    """[10, 11, 12, 14] -> '10-12, 14'."""
    ranges: List[List[int]] = []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def trace_note(run: Run) -> Tuple[str, bool]:
    """Which steps the step pictures come from (and True), or why there are none (and False)."""
    train = run.config.get("train") or {}
    window = train.get("trace_steps")
    every = train.get("trace_every") or 0
    schedule = (f"train.trace_steps {window}" + (f", every {every} steps" if every else "")) if window else ""
    steps = traced_steps(run.trace)
    if steps:
        return (f"The traces hold steps {step_ranges(steps)} ({schedule or 'every step'}); the step pictures "
                "show the median-length one of them. Curves over the run come from every step's metrics.", True)
    swap_trace = (run.config.get("swap") or {}).get("trace")
    if not (swap_trace or (run.config.get("comm") or {}).get("timeline")):
        return ("No trace in this run: set swap.trace and comm.timeline (e.g. {output_dir}/swap_trace.json) to "
                "see memory and the timeline of one step.", False)
    if not swap_trace or not (run.config.get("swap") or {}).get("enabled"):
        return "No step pictures: they need the swap engine on and swap.trace set (its compute spans).", False
    return (f"No traced step in this run: it records {schedule or 'train.trace_steps'}, and the run ended at step "
            f"{run.summary.get('last_step', '?')}; set train.trace_steps to steps the run reaches.", False)
