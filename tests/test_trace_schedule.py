"""The trace schedule (train.trace_steps / train.trace_every): which steps are recorded, the window
every trace writer of a rank follows, and what a windowed writer puts in its file."""
from __future__ import annotations

from pathlib import Path

from lmsdp.launcher.train.memory_meter import peak_totals
from lmsdp.launcher.train.metrics import LogHistogram, RunSummary
from lmsdp.runtime.chrome_trace import ChromeTrace, load_trace
from lmsdp.runtime.trace_schedule import TraceSchedule, TraceWindow


def test_a_window_once_and_repeated() -> None:
    once = TraceSchedule(10, 14)
    assert [s for s in range(1, 100) if once.active(s)] == [10, 11, 12, 13, 14]
    repeated = TraceSchedule(3, 4, every=10)
    assert [s for s in range(1, 40) if repeated.active(s)] == [3, 4, 13, 14, 23, 24, 33, 34]
    assert repeated.windows(24) == [(3, 4), (13, 14), (23, 24)] and once.windows(9) == []
    assert once.describe() == "steps 10-14" and repeated.describe() == "steps 3-4, then 2 every 10"


def test_a_windowed_writer_keeps_metadata_and_only_the_traced_steps(tmp_path: Path) -> None:
    window = TraceWindow(TraceSchedule(2, 3))
    trace = ChromeTrace(str(tmp_path / "t.json"), 0, {7: "lane"}, window=window)
    for step in range(1, 6):
        window.begin(step)
        trace.span(f"work {step}", 7, step * 100.0, step * 100.0 + 50)
    trace.close()
    events = load_trace(str(tmp_path / "t.json"))
    assert [e["name"] for e in events if e["ph"] == "X"] == ["work 2", "work 3"]
    assert {e["name"] for e in events if e["ph"] == "M"} == {"process_name", "thread_name"}


def test_run_summary_keeps_running_totals_not_records() -> None:
    """Fixed memory however many steps: no list of records, medians from a bucketed histogram."""
    summary = RunSummary()
    for step in range(1, 2001):
        summary.add({"step": step, "loss": 1.0 / step, "step_time_s": 0.1 + (step % 7) * 0.01,
                     "samples_per_s": 100.0, "allreduce_ms": 2.0, "allreduce_hidden_frac": 0.5})
    totals = summary.totals()
    assert not any(isinstance(v, list) for v in vars(summary).values())
    assert totals["steps_run"] == 2000 and totals["last_step"] == 2000
    assert abs(totals["step_time_median_s"] - 0.13) < 0.13 * 0.006
    assert totals["allreduce_ms_total"] == 4000.0 and totals["allreduce_hidden_frac_mean"] == 0.5
    histogram = LogHistogram()
    for value in (3.0, 1.0, 2.0):
        histogram.add(value)
    assert abs(histogram.median() - 2.0) < 0.01


def test_peaks_over_ranks_name_the_rank() -> None:
    assert peak_totals([{"rss_bytes": 5}, {"rss_bytes": 9}]) == {"rss_peak_bytes": 9, "rss_peak_rank": 1}


def test_the_report_says_which_steps_the_traces_hold_or_why_none() -> None:
    from lmsdp.launcher.tools.run_data import Run, step_ranges, trace_note

    assert step_ranges([10, 11, 12, 510, 511, 900]) == "10-12, 510-511, 900"
    config = {"train": {"trace_steps": [10, 14], "trace_every": 500}, "swap": {"enabled": True, "trace": "t.json"}}
    spans = [{"ph": "X", "name": "forward", "pid": 0, "ts": 0, "args": {"step": s}} for s in (10, 11, 510)]
    note, traced = trace_note(Run(path="r", config=config, trace=spans))
    assert traced and note.startswith("The traces hold steps 10-11, 510 (train.trace_steps [10, 14], every 500 steps)")
    note, traced = trace_note(Run(path="r", config=config, summary={"last_step": 5}, trace=[{"ph": "M"}]))
    assert not traced and "ended at step 5" in note and "train.trace_steps" in note
