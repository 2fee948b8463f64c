"""`lmsrun report` on real runs: a 2-rank quickstart under mpirun draws every picture and a
self-contained page; a killed run's cut-off line is skipped with a warning; two runs are compared;
bad directories are one-line errors; TensorBoard event files hold the step scalars; the swap engine's
memory timeline goes up in forward and back to zero once backward has freed the graph."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from lmsdp.runtime.chrome_trace import load_trace
from lmsdp.runtime.trace_schedule import TraceSchedule
from lmsdp.swapping import SwapEngine
from lmsdp.swapping.config import SwapConfig
from lmsdp.swapping.trace import MEMORY_COUNTER, TRACKS

REPO = Path(__file__).resolve().parents[1]
LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
STEPS = 6
RUN_PNGS = ("memory_step.png", "timeline_step.png", "run_curves.png")


def lmsrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([LMSRUN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train(out: Path, *overrides: str, np_: int = 2) -> None:
    sets = [f"train.steps={STEPS}", "train.checkpoint_every=0", "train.progress=false", "launch.threads=1",
            f"train.trace_steps=[2,{STEPS - 1}]", *overrides]
    args = ["configs/quickstart.yaml", "-np", str(np_), "--output-dir", str(out)]
    for item in sets:
        args += ["--set", item]
    done = lmsrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """The quickstart config, 2 ranks under mpirun, swap trace + comm timeline + TensorBoard on."""
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    train(out, "train.tensorboard=true")
    return out


def plotted_pixels(png: Path) -> float:
    """Share of pixels that are neither white nor near-white (axes, text, curves, bars)."""
    import matplotlib.image as mpimg

    image = mpimg.imread(str(png))[..., :3]
    return float((image.min(axis=2) < 0.9).mean())


def has_color(png: Path, hex_color: str, min_pixels: int = 30) -> bool:
    import matplotlib.image as mpimg

    image = (mpimg.imread(str(png))[..., :3] * 255).round().astype(int)
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=2) <= 3).sum()) >= min_pixels


def one_line_errors(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("lmsrun: error:")]


@pytest.mark.integration
@pytest.mark.mpi
def test_report_of_a_two_rank_run_draws_every_picture_and_a_self_contained_page(quickstart, tmp_path):
    out = tmp_path / "rep"
    done = lmsrun("report", str(quickstart), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"report: {out}/report.html" in done.stdout
    for name in RUN_PNGS:
        assert plotted_pixels(out / name) > 0.02, name  # decodable and not blank
    from lmsdp.launcher.tools.plots import COLORS
    assert has_color(out / "timeline_step.png", COLORS["forward"])   # compute bars drawn
    assert has_color(out / "timeline_step.png", COLORS["backward"])
    assert has_color(out / "timeline_step.png", COLORS["comm"])      # allreduce lane drawn
    assert has_color(out / "memory_step.png", COLORS["swap-out"], 10)  # swap-out markers
    page = (out / "report.html").read_text()
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"', page)
    assert sorted(alt for _, alt in embedded) == sorted(RUN_PNGS)
    assert all(data.startswith("iVBORw0KGgo") for data, _ in embedded)  # PNG signature
    assert "resnet18, 2 ranks" in page and "swap_out_bytes" in page   # what the run was + summary table
    assert f"The traces hold steps 2-{STEPS - 1} (train.trace_steps [2, {STEPS - 1}])" in page  # which steps are drawn
    assert "rss_peak_bytes" in page and "rss_peak_rank" in page          # host memory, a first-class figure


@pytest.mark.integration
@pytest.mark.mpi
def test_trace_of_the_run_holds_the_memory_counter_and_both_ranks(quickstart):
    events = json.loads((quickstart / "trace.json").read_text())["traceEvents"]
    counters = [e for e in events if e["ph"] == "C" and e["name"] == MEMORY_COUNTER]
    assert {e["pid"] for e in counters} == {0, 1}
    assert max(e["args"]["resident_bytes"] for e in counters) > 0
    assert {e["tid"] for e in events if e["ph"] == "X" and e["pid"] == 1} >= {0, 1, 2, 100}
    assert json.loads((quickstart / "config.json").read_text())["name"] == "quickstart"


@pytest.mark.integration
@pytest.mark.mpi
def test_killed_run_with_a_cut_off_line_is_reported_from_what_is_readable(quickstart, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(quickstart, run)
    (run / "summary.json").unlink()
    (run / "trace.json").unlink()  # rank 0 never merged: the per-rank traces are read instead
    with open(run / "metrics.rank1.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 2.3, "step_ti')
    done = lmsrun("report", str(run))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("lmsrun: warning:")]
    assert any("metrics.rank1.jsonl:7: unreadable line skipped" in w for w in warnings), done.stderr
    assert any("no summary.json" in w for w in warnings)
    assert "Traceback" not in done.stderr
    for name in RUN_PNGS:
        assert plotted_pixels(run / "report" / name) > 0.02
    assert "unreadable line skipped" in (run / "report" / "report.html").read_text()


@pytest.mark.integration
@pytest.mark.mpi
def test_two_runs_are_compared_side_by_side(quickstart, tmp_path):
    off = tmp_path / "swap-off"
    train(off, "swap.enabled=false", "name=quickstart-swap-off", np_=1)
    out = tmp_path / "cmp"
    done = lmsrun("report", str(quickstart), str(off), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert plotted_pixels(out / "compare_curves.png") > 0.02
    assert (out / "run1_memory_step.png").exists() and (out / "run2_run_curves.png").exists()
    assert not (out / "run2_memory_step.png").exists()  # swap off: no engine, no memory trace
    page = (out / "report.html").read_text()
    header = re.search(r"<tr><th>metric</th>(.*?)</tr>", page).group(1)
    assert "quickstart" in header and "quickstart-swap-off" in header
    assert "compare_curves.png" in page and "swap.trace" in page  # the no-trace hint for run 2


@pytest.mark.integration
@pytest.mark.mpi
def test_runs_of_different_models_are_drawn_with_a_warning(quickstart, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(quickstart, other)
    config = json.loads((other / "config.json").read_text())
    config["name"], config["model"]["name"] = "other", "gpt"
    (other / "config.json").write_text(json.dumps(config))
    done = lmsrun("report", str(quickstart), str(other), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    assert any("different models" in line for line in done.stderr.splitlines())


@pytest.mark.integration
def test_bad_directories_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target, words in ((empty, "holds no run"), (tmp_path / "missing", "is not a directory")):
        done = lmsrun("report", str(target), timeout=60)
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
        assert one_line_errors(done.stderr)[0].startswith(f"lmsrun: error: RUN_DIR: {target}")
        assert words in done.stderr


@pytest.mark.integration
@pytest.mark.mpi
def test_a_bad_directory_among_good_ones_is_left_out_with_a_warning(quickstart, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = lmsrun("report", str(quickstart), str(empty), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert any("holds no run" in line and "left out" in line for line in done.stderr.splitlines())


@pytest.mark.integration
@pytest.mark.mpi
def test_tensorboard_event_files_hold_the_step_scalars(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = quickstart / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    acc = EventAccumulator(str(tb))
    acc.Reload()
    records = [json.loads(line) for line in (quickstart / "metrics.rank0.jsonl").read_text().splitlines()]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    tags = set(acc.Tags()["scalars"])
    assert {"train/samples_per_s", "swap/hidden_frac", "swap/stall_ms", "comm/allreduce_ms"} <= tags


def test_tensorboard_missing_is_a_config_error(monkeypatch, tmp_path):
    from lmsdp.launcher.config.errors import ConfigError
    from lmsdp.launcher.train.tensorboard import open_scalars

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match=r"^train\.tensorboard: the 'tensorboard' package is not installed"):
        open_scalars(True, False, str(tmp_path))  # every rank checks, not only rank 0
    assert open_scalars(False, True, str(tmp_path)) is None


def _step(engine: SwapEngine, model: torch.nn.Module, x: torch.Tensor) -> Dict[str, float]:
    with engine:
        loss = model(x).square().mean()
    loss.backward()
    return engine.step_end()


def test_memory_timeline_rises_in_forward_and_returns_to_zero_after_backward(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()) for _ in range(6)])
    x = torch.randn(64, 256)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=4096, keep_last=1, budget=0, prefetch=2,
                                   transport="loopback", trace=str(tmp_path / "t.json")), "cpu",
                        trace_window=TraceSchedule(1, 2))  # both steps traced
    for _ in range(2):
        stats = _step(engine, model, x)
    timeline = engine.last_memory_timeline
    held = [b for _, b in timeline]
    assert held[-1] == 0                      # backward freed every saved tensor
    assert max(held) == stats["peak_saved_bytes"] or max(held) >= 64 * 256 * 4
    assert all(b >= 0 for b in held)
    assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
    engine.close()
    events = load_trace(str(tmp_path / "t.json"))
    counters = [e for e in events if e["ph"] == "C" and e["name"] == MEMORY_COUNTER]
    assert len(counters) >= 2 * len(timeline) - 2  # both steps' samples
    assert any(e.get("tid") == TRACKS["swap-out"] for e in events)
