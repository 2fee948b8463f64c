"""Drawing for ``lmsrun report`` (matplotlib, Agg): memory over one step, the timeline of one step per
rank, curves over the run, and several runs overlaid. Input is ``tools/run_data.Run``; output PNGs.

One step = from the forward start of a steady-state step (the median-length step after the first,
which pays warm-up) to the next step's forward start, on each rank's own clock."""
from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from lmsdp.swapping.trace import MEMORY_COUNTER, TRACKS  # noqa: E402

if TYPE_CHECKING:
    from .run_data import Run

MiB = float(1 << 20)
DEVICE_COUNTER = "device memory allocated"
COMM_TID, COMM_WAIT_TID = 100, 101  # lmsdp.comm.base.ChromeTrace lanes
COLORS = {"forward": "#4c72b0", "backward": "#55a868", "swap-out": "#dd8452", "swap-in": "#8172b3",
          "comm": "#937860", "stall": "#c44e52"}
MAX_RANKS_DRAWN = 8
Event = Dict[str, Any]


# ------------------------------------------------------------------------------------ step choice
def compute_spans(events: List[Event]) -> Dict[int, Dict[int, Dict[str, Event]]]:
    """pid -> engine step -> {"forward": span, "backward": span} from the swap trace's compute lane."""
    out: Dict[int, Dict[int, Dict[str, Event]]] = {}
    for ev in events:
        if ev.get("ph") == "X" and ev.get("tid") == TRACKS["compute"] and ev.get("name") in ("forward", "backward"):
            step = (ev.get("args") or {}).get("step")
            if step is not None:
                out.setdefault(int(ev["pid"]), {}).setdefault(int(step), {})[ev["name"]] = ev
    return out


def steady_step(spans: Dict[int, Dict[int, Dict[str, Event]]]) -> Optional[int]:
    """The step of median length (forward start to backward end) on the lowest rank, skipping the first."""
    if not spans:
        return None
    steps = spans[min(spans)]
    complete = sorted(s for s, parts in steps.items() if "forward" in parts and "backward" in parts)
    if len(complete) > 2:
        complete = complete[1:]
    if not complete:
        return None
    length = {s: _end(steps[s]["backward"]) - steps[s]["forward"]["ts"] for s in complete}
    median = statistics.median_low(length.values())
    return next(s for s in complete if length[s] == median)


def step_window(spans: Dict[int, Dict[str, Event]], step: int, events: List[Event], pid: int) -> Tuple[float, float]:
    """(start, end) in trace microseconds of ``step`` on one rank."""
    start = spans[step]["forward"]["ts"]
    later = [parts["forward"]["ts"] for s, parts in spans.items() if s > step and "forward" in parts]
    if later:
        return start, min(later)
    ends = [_end(ev) for ev in events if ev.get("pid") == pid and ev.get("ph") == "X" and ev["ts"] >= start]
    return start, max(ends, default=_end(spans[step].get("backward", spans[step]["forward"])))


def _end(ev: Event) -> float:
    return float(ev["ts"]) + float(ev.get("dur", 0.0))


def _in_window(ev: Event, start: float, end: float) -> bool:
    return ev["ts"] < end and _end(ev) > start


# ------------------------------------------------------------------------------------------ drawing
def draw_run(run: "Run", out_dir: str, prefix: str, warn: Callable[[str], None]) -> List[str]:
    """Every picture one run supports; returns their paths."""
    written: List[str] = []
    spans = compute_spans(run.trace)
    step = steady_step(spans)
    if run.trace and step is None:
        warn(f"{run.path}: the traces hold no complete forward+backward step (swap.trace unset, or the run "
             "ended before train.trace_steps?); no memory or step timeline")
    if step is not None:
        path = os.path.join(out_dir, f"{prefix}memory_step.png")
        if draw_memory(run, spans, step, path):
            written.append(path)
        path = os.path.join(out_dir, f"{prefix}timeline_step.png")
        draw_timeline(run, spans, step, path, warn)
        written.append(path)
    if any(run.metrics.values()):
        path = os.path.join(out_dir, f"{prefix}run_curves.png")
        draw_curves([run], path, f"{run.label} over the run: {run.describe()}")
        written.append(path)
    return written


def draw_memory(run: "Run", spans: Dict[int, Dict[int, Dict[str, Event]]], step: int, path: str) -> bool:
    """Saved-activation bytes on the device over one step of the lowest rank, with swap-outs/ins, the
    budget line, the forward/backward boundary and (GPU runs) the allocator's figure."""
    pid = min(spans)
    start, end = step_window(spans[pid], step, run.trace, pid)
    mine = [ev for ev in run.trace if ev.get("pid") == pid]
    saved = _counter(mine, MEMORY_COUNTER, "resident_bytes", start, end)
    if not saved:
        return False
    device = _counter(mine, DEVICE_COUNTER, "device_allocated_bytes", start, end)
    ms = lambda t: (t - start) / 1e3  # noqa: E731
    fig, ax = plt.subplots(figsize=(11, 4.6))
    xs, ys = [ms(t) for t, _ in saved], [v / MiB for _, v in saved]
    ax.step(xs, ys, where="post", color=COLORS["forward"], lw=1.6, label="saved activations on device")
    if device:
        ax.step([ms(t) for t, _ in device], [v / MiB for _, v in device], where="post", color="#333333",
                lw=1.2, label="device memory allocated (all tensors)")
    for tid, marker, kind in ((TRACKS["swap-out"], "v", "swap-out"), (TRACKS["swap-in"], "^", "swap-in")):
        times = [ms(ev["ts"]) for ev in mine if ev.get("tid") == tid and ev.get("ph") == "X"
                 and start <= ev["ts"] < end]
        if times:
            ax.plot(times, [_value_at(xs, ys, t) for t in times], marker, color=COLORS[kind], ms=6, ls="none",
                    label=f"{kind} starts ({len(times)})")
    backward = spans[pid][step].get("backward")
    if backward is not None:
        ax.axvspan(0, ms(backward["ts"]), color=COLORS["forward"], alpha=0.06, lw=0)
        ax.axvline(ms(backward["ts"]), color="#555555", ls=":", lw=1)
        ax.text(ms(backward["ts"]), 1.0, " backward starts", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color="#555555")
        ax.text(0, 1.0, " forward", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#555555")
    budget = (run.config.get("swap") or {}).get("budget")
    if isinstance(budget, (int, float)) and budget > 0:
        ax.axhline(budget / MiB, color=COLORS["stall"], ls="--", lw=1, label=f"swap budget ({budget / MiB:.1f} MiB)")
    tiers = tier_text(next((r for r in run.metrics.get(pid, []) if r.get("step") == step), {}))
    if tiers:
        ax.text(0.005, 0.90, tiers, transform=ax.transAxes, va="top", fontsize=8, color="#333333")
    peak = max(ys)
    ax.annotate(f"peak {peak:.1f} MiB", (xs[ys.index(peak)], peak), textcoords="offset points", xytext=(6, 4),
                fontsize=8)
    ax.set_xlabel(f"ms since forward start of step {step}")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0, top=max([peak] + [v / MiB for _, v in device] + [0.1]) * 1.18)
    ax.set_xlim(0, ms(end))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.set_title(f"{run.label}: memory over one step (rank {pid}, step {step})\n{run.describe()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def tier_text(record: Dict[str, Any]) -> str:
    """Where a step's swapped bytes went (host pool, disk tier with its GB/s), from its metrics record."""
    if not record.get("disk_write_bytes") and not record.get("disk_read_bytes"):
        return ""
    return (f" host tier {record.get('host_tier_bytes', 0) / MiB:.1f} MiB; disk tier wrote "
            f"{record['disk_write_bytes'] / MiB:.1f} MiB at {record.get('disk_write_gbps', 0):.2f} GB/s, read "
            f"{record.get('disk_read_bytes', 0) / MiB:.1f} MiB at {record.get('disk_read_gbps', 0):.2f} GB/s, "
            f"compute waited {record.get('disk_stall_ms', 0):.1f} ms on it")


def _counter(events: List[Event], name: str, key: str, start: float, end: float) -> List[Tuple[float, float]]:
    """Samples of a counter inside [start, end), led by the last value before ``start``."""
    samples = sorted((ev["ts"], float((ev.get("args") or {}).get(key, 0)))
                     for ev in events if ev.get("ph") == "C" and ev.get("name") == name)
    before = [v for t, v in samples if t < start]
    inside = [(t, v) for t, v in samples if start <= t < end]
    if not inside:
        return []
    lead = [(start, before[-1])] if before else [(start, 0.0)]
    return lead + inside + [(end, inside[-1][1])]


def _value_at(xs: List[float], ys: List[float], x: float) -> float:
    value = ys[0]
    for xi, yi in zip(xs, ys):
        if xi > x:
            break
        value = yi
    return value


def draw_timeline(run: "Run", spans: Dict[int, Dict[int, Dict[str, Event]]], step: int, path: str,
                  warn: Callable[[str], None]) -> None:
    """One step per rank: compute (forward/backward, swap-in stalls in red), swap-out, swap-in and the
    gradient collective lane (its exposed wait in red), each rank from its own forward start."""
    pids = sorted(pid for pid in spans if step in spans[pid] and "forward" in spans[pid][step])
    if len(pids) > MAX_RANKS_DRAWN:
        warn(f"{run.path}: {len(pids)} ranks; the step timeline shows the first {MAX_RANKS_DRAWN}")
        pids = pids[:MAX_RANKS_DRAWN]
    comm_name = _comm_lane_name(run.trace)
    lanes = ["compute", "swap-out", "swap-in", comm_name]
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(lanes) * len(pids) + 1.6))
    labels, y = [], 0
    width_ms = 0.0
    for pid in pids:
        start, end = step_window(spans[pid], step, run.trace, pid)
        width_ms = max(width_ms, (end - start) / 1e3)
        mine = [ev for ev in run.trace if ev.get("pid") == pid and ev.get("ph") == "X" and _in_window(ev, start, end)]

        def bars(select: Callable[[Event], bool], row: int, color: str, height: float = 0.7) -> None:
            chosen = [((ev["ts"] - start) / 1e3, max(ev.get("dur", 0.0) / 1e3, 0.02)) for ev in mine if select(ev)]
            if chosen:
                ax.broken_barh(chosen, (row - height / 2, height), facecolors=color, lw=0)

        rows = {lane: y + i for i, lane in enumerate(lanes)}
        bars(lambda ev: ev.get("tid") == TRACKS["compute"] and ev["name"] == "forward", rows["compute"], COLORS["forward"])
        bars(lambda ev: ev.get("tid") == TRACKS["compute"] and ev["name"] == "backward", rows["compute"], COLORS["backward"])
        bars(lambda ev: ev.get("tid") == TRACKS["stall"], rows["compute"], COLORS["stall"], 0.9)
        bars(lambda ev: ev.get("tid") == TRACKS["swap-out"], rows["swap-out"], COLORS["swap-out"])
        bars(lambda ev: ev.get("tid") == TRACKS["swap-in"], rows["swap-in"], COLORS["swap-in"])
        bars(lambda ev: ev.get("tid") == COMM_TID, rows[comm_name], COLORS["comm"])
        bars(lambda ev: ev.get("tid") == COMM_WAIT_TID, rows[comm_name], COLORS["stall"], 0.35)
        labels += [f"rank {pid}  {lane}" for lane in lanes]
        y += len(lanes)
        if pid != pids[-1]:
            ax.axhline(y - 0.5, color="#bbbbbb", lw=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, width_ms)
    ax.set_xlabel(f"ms since each rank's forward start of step {step}")
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=COLORS["forward"], label="forward"), Patch(color=COLORS["backward"], label="backward"),
              Patch(color=COLORS["swap-out"], label="swap-out"), Patch(color=COLORS["swap-in"], label="swap-in"),
              Patch(color=COLORS["comm"], label=comm_name),
              Patch(color=COLORS["stall"], label=f"stall: compute waits on a swap-in / on the {comm_name}")]
    ax.legend(handles=legend, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14 if len(pids) < 3 else -0.06),
              ncol=6, frameon=False)
    ax.set_title(f"{run.label}: one step per rank (step {step})\n{run.describe()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _comm_lane_name(events: List[Event]) -> str:
    """'allreduce', 'all-gather / reduce-scatter', ...: the first words of the collective spans' names."""
    kinds: List[str] = []
    for ev in events:
        if ev.get("tid") == COMM_TID and ev.get("ph") == "X":
            kind = str(ev.get("name", "allreduce")).split(" ")[0]
            if kind not in kinds:
                kinds.append(kind)
    return " / ".join(kinds) or "allreduce"


# ----------------------------------------------------------------------------------------- curves
CURVES = [  # (title, y label, metric key, scale)
    ("loss", "loss", "loss", 1.0),
    ("throughput", "samples/s (all ranks)", "samples_per_s", 1.0),
    ("step time", "ms", "step_time_s", 1e3),
    ("swap hidden fraction", "hidden / (swap-out + swap-in time)", "hidden_frac", 1.0),
    ("allreduce hidden fraction", "hidden behind backward", "allreduce_hidden_frac", 1.0),
    ("stall per step", "ms", "stall_ms", 1.0),
    ("host memory (RSS)", "MiB", "rss_bytes", 1 / MiB),
    ("device memory (CUDA)", "MiB", "device_reserved_bytes", 1 / MiB),
]
OVERLAYS = {  # a second, dashed line in a panel: (metric key, what the dashes are)
    "loss": ("eval_loss", "train solid, validation dashed"),
    "stall_ms": ("comm_wait_ms", "swap stall solid, allreduce wait dashed"),
    "device_reserved_bytes": ("device_allocated_bytes", "reserved solid, allocated dashed"),
}


def series(run: "Run", key: str, scale: float) -> Optional[Tuple[List[int], List[float], List[float], List[float]]]:
    """(steps, mean over ranks, min, max) of one metric; None when no rank recorded it."""
    by_step: Dict[int, List[float]] = {}
    for records in run.metrics.values():
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)):
                by_step.setdefault(int(record["step"]), []).append(float(value) * scale)
    if not by_step:
        return None
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def draw_curves(runs: List["Run"], path: str, title: str) -> None:
    """The run-long panels; one line per run (mean over ranks, min-max band when ranks differ)."""
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.2))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, ylabel, key, scale) in zip(axes.flat, CURVES):
        steady_max = 0.0
        drawn = False
        for index, run in enumerate(runs):
            data = series(run, key, scale)
            if data is None:
                continue
            steps, mean, low, high = data
            color = palette[index % len(palette)]
            ax.plot(steps, mean, color=color, lw=1.4, label=run.label)
            if len(run.metrics) > 1 and any(h - lo > 1e-12 for lo, h in zip(low, high)):
                ax.fill_between(steps, low, high, color=color, alpha=0.18, lw=0)
            steady_max = max(steady_max, max(high[1:] or high))
            drawn = True
            if key in OVERLAYS:
                second = series(run, OVERLAYS[key][0], scale)
                if second is not None:
                    ax.plot(second[0], second[1], color=color, lw=1.0, ls="--")
                    steady_max = max(steady_max, max(second[3][1:] or second[3]))
        if not drawn:
            ax.text(0.5, 0.5, f"not recorded\n({key})", ha="center", va="center", transform=ax.transAxes, color="#888888")
        elif key not in ("loss",) and steady_max > 0:
            ax.set_ylim(0, steady_max * 1.15)  # step 1 pays warm-up: let it go off the top
        if key.endswith("hidden_frac"):
            ax.set_ylim(-0.02, 1.05)
        ax.set_title(name + (f" ({OVERLAYS[key][1]})" if key in OVERLAYS else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=palette[i % len(palette)], lw=2, label=r.label) for i, r in enumerate(runs)]
    if len(runs) > 1 or any(len(r.metrics) > 1 for r in runs):
        note = "line: mean over ranks; band: min to max over ranks" if any(len(r.metrics) > 1 for r in runs) else ""
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(runs)), fontsize=9, frameon=False,
                   title=note or None, title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_comparison(runs: List["Run"], out_dir: str) -> List[str]:
    """The run-long curves of every run overlaid."""
    path = os.path.join(out_dir, "compare_curves.png")
    draw_curves(runs, path, "comparison: " + " vs ".join(r.label for r in runs))
    return [path]
