"""``lmsrun report RUN_DIR [RUN_DIR ...] [--out DIR]``: read what runs wrote and draw them.

A run directory (``train.output_dir``) holds ``metrics.rank<R>.jsonl`` (one record per step and
rank), ``summary.json`` and ``config.json`` (rank 0), and with ``swap.trace`` / ``comm.timeline`` the
per-rank traces and their merge ``trace.json``. This module finds and loads them, tolerating what a
killed run leaves (a cut-off JSONL line, no summary, no merged trace): each problem is one warning
line and the report is drawn from what is readable. Drawing is ``launcher.plots``; the page is
``write_html`` here. Bad input is a one-line ``lmsrun: error:`` and exit code 2.
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from lmsdp.launcher.config.argtypes import OneLineParser
from lmsdp.launcher.config.errors import UserError

from .run_data import Run, Warn, check_comparable, label_runs, load_run, size_text, trace_note


# ------------------------------------------------------------------------------------------- output
def default_out(run_dirs: Sequence[str]) -> str:
    first = os.path.normpath(run_dirs[0])
    if len(run_dirs) == 1:
        return os.path.join(first, "report")
    return os.path.join(os.path.dirname(first) or ".", "report-compare")


def write_html(path: str, runs: List[Run], images: Dict[str, List[str]], comparison: List[str],
               notes: List[str]) -> None:
    """One self-contained page: every PNG embedded as a data URI, summary tables, warnings."""
    def img(png: str) -> str:
        with open(png, "rb") as handle:
            data = base64.b64encode(handle.read()).decode("ascii")
        name = html.escape(os.path.basename(png))
        return f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lmsdp report: "
             + html.escape(", ".join(r.label for r in runs)) + "</title><style>"
             "body{font-family:sans-serif;max-width:1300px;margin:1em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px}"
             "td.v{text-align:right;font-family:monospace}img{max-width:100%}figure{margin:1em 0}"
             "figcaption{font-size:11px;color:#777}.warn{color:#a60}</style></head><body>",
             "<h1>lmsdp run report</h1>"]
    if notes:
        parts.append("<ul>" + "".join(f"<li class='warn'>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if len(runs) > 1:
        parts.append("<h2>Comparison</h2>" + summary_table(runs) + "".join(img(p) for p in comparison))
    for run in runs:
        parts.append(f"<h2>{html.escape(run.label)}</h2><p>{html.escape(run.describe())}<br>"
                     f"<code>{html.escape(os.path.abspath(run.path))}</code></p>")
        if len(runs) == 1:
            parts.append(summary_table(runs))
        note, traced = trace_note(run)
        parts.append(f"<p{'' if traced else ' class=warn'}>{html.escape(note)}</p>")
        parts.extend(img(p) for p in images.get(run.path, []))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def summary_table(runs: List[Run]) -> str:
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run.summary if k not in keys]
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs) + "</tr>"
    rows = []
    for key in keys:
        cells = "".join(f"<td class='v'>{html.escape(_show(key, r.summary.get(key)))}</td>" for r in runs)
        rows.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _show(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "bytes" in key:
        return size_text(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmsrun report", allow_abbrev=False,
        description="Plots of a run (memory over one step, timeline of one step per rank, curves over the "
                    "run) and report.html; with several runs, their curves overlaid and summaries side by side.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's train.output_dir, e.g. runs/quickstart")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs and report.html go "
                        "(default: RUN_DIR/report, or report-compare next to the first RUN_DIR)")
    return parser


def make_report(run_dirs: Sequence[str], out: Optional[str], warn: Warn) -> str:
    """Load, draw, write; returns the path of report.html. Warnings also go on the page."""
    notes: List[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    runs: List[Run] = []
    for path in run_dirs:
        try:
            runs.append(load_run(path, note))
        except UserError as exc:
            if len(run_dirs) == 1:
                raise
            note(f"{exc}; left out")
    if not runs:
        raise UserError("RUN_DIR: none of the directories holds a run; give runs' train.output_dir")
    label_runs(runs)
    check_comparable(runs, note)
    try:
        from lmsdp.launcher.tools import plots
    except ImportError as exc:
        raise UserError(f"report: matplotlib is needed to draw ({exc}); pip install matplotlib") from None
    out_dir = out or default_out([r.path for r in runs])
    os.makedirs(out_dir, exist_ok=True)
    images: Dict[str, List[str]] = {}
    for index, run in enumerate(runs, 1):
        prefix = "" if len(runs) == 1 else f"run{index}_"
        images[run.path] = plots.draw_run(run, out_dir, prefix, note)
    comparison = plots.draw_comparison(runs, out_dir) if len(runs) > 1 else []
    report = os.path.join(out_dir, "report.html")
    write_html(report, runs, images, comparison, notes)
    return report


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)

    def warn(message: str) -> None:
        print(f"lmsrun: warning: {message}", file=sys.stderr, flush=True)

    path = make_report(args.run_dirs, args.out, warn)
    print(f"[lmsdp] report: {path}", flush=True)
    return 0
