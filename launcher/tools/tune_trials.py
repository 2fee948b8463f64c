"""``lmsrun tune``'s trials: each is a real job, with the same flags (``launch.flags``), plan
(``launch_plan.make_plan``), command builder and runner (``launch.spawn``) as ``lmsrun CONFIG -np N``,
``train.steps`` small, in a temporary output folder; samples/s is the median of rank 0's metrics after
the warm-up steps, and a failed trial is named by the runner's own account."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from typing import Iterator, List, Optional
from lmsdp.runtime import run_folder

from .tune_search import Setting, Trial, core_binding

# trials: real jobs through the normal launch path


class TrialRunner:
    """Runs one Setting as ``lmsrun CONFIG -np N --threads T ...`` through mpirun and reads samples/s."""

    def __init__(self, config_path: str, overrides: List[str], steps: int, warmup: int, workdir: str,
                 deadline: float) -> None:
        self.config_path, self.overrides = config_path, overrides
        self.steps, self.warmup, self.workdir, self.deadline = steps, warmup, workdir, deadline
        self.count = 0
        self.interrupted = False

    def run(self, setting: Setting) -> Trial:
        from lmsdp.launcher.launch.flags import build_parser
        from lmsdp.launcher.launch.launch_plan import make_plan, mpi_command
        from lmsdp.launcher.launch.spawn import Job, Runner

        self.count += 1
        out_dir = os.path.join(self.workdir, f"trial{self.count}")
        argv = [self.config_path, "-np", str(setting.np), "--threads", str(setting.threads),
                "--output-dir", out_dir]
        for item in self.overrides + [
                f"train.steps={self.steps}", "train.progress=false", "train.resume=false",
                "train.checkpoint_every=0", f"train.checkpoint_dir={json.dumps(os.path.join(out_dir, 'ckpt'))}",
                f"train.batch_size={setting.batch}", f"launch.interop_threads={setting.interop}"]:
            argv += ["--set", item]
        if setting.bind == "core":
            argv += ["--mpi-args", core_binding(setting.threads)]
        args = build_parser().parse_args(argv)
        plan = make_plan(args, None)
        command, flavor, env, _hosts = mpi_command(plan)
        job = Job(command=command, env=env, flavor=flavor, output_dir=out_dir, stop_timeout=5.0, np=plan.np)
        started = time.monotonic()
        runner = Runner(job)
        with _quiet(os.path.join(out_dir, "lmsrun.log")), _deadline(self.deadline) as cut:
            code = runner.run()
        trial = Trial(setting, wall_s=time.monotonic() - started, backend=read_backend(out_dir))
        if runner.signals and not cut.is_set():
            self.interrupted = True  # the user's Ctrl-C / SIGTERM: stop tuning
        if cut.is_set():  # stopped after a step at the budget: the steps it finished still count
            trial.samples_per_s = read_samples_per_s(out_dir, self.warmup)
            trial.note = "cut at the time budget"
            if trial.samples_per_s is None:
                trial.error = "cut at the time budget"
        elif code != 0:  # a rank died or failed: its finished steps are no measure of the setting
            trial.error = "interrupted" if self.interrupted else failure_reason(out_dir, code, runner.outcome)
        else:
            trial.samples_per_s = read_samples_per_s(out_dir, self.warmup)
            if trial.samples_per_s is None:
                trial.error = f"no step after the {self.warmup} warm-up step(s) was recorded"
        return trial


@contextlib.contextmanager
def _quiet(log_path: str) -> Iterator[None]:
    """Send the trial's output (rank 0's summary table, mpirun's words) to a log file, not the screen."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    handle = open(log_path, "ab")
    text = io.TextIOWrapper(handle, write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = text
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        text.close()


@contextlib.contextmanager
def _deadline(deadline: float) -> Iterator[threading.Event]:
    """At ``deadline`` send this process SIGTERM once: the runner turns it into 'every rank stops after
    this step' (the same path as Ctrl-C). The event says whether it fired."""
    fired, lock, running = threading.Event(), threading.Lock(), [True]

    def fire() -> None:
        with lock:
            if running[0]:
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        with lock:
            running[0] = False
        timer.cancel()


def read_samples_per_s(out_dir: str, warmup: int) -> Optional[float]:
    """Median samples/s of rank 0's steps after ``warmup`` (None: no measured step)."""
    path = run_folder.metrics_file(out_dir, 0)
    try:
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return None
    values = [r["samples_per_s"] for r in records if r.get("step", 0) > warmup and "samples_per_s" in r]
    return statistics.median(values) if values else None


def read_backend(out_dir: str) -> str:
    """The comm backend rank 0 reported in the trial's summary.json ('' when it wrote none)."""
    try:
        with open(os.path.join(out_dir, run_folder.SUMMARY), encoding="utf-8") as handle:
            return str(json.load(handle).get("comm_backend", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def failure_reason(out_dir: str, code: int, outcome: str = "") -> str:
    """One line: out of memory spelled out, else the runner's own account (``Runner.outcome``), else the
    rank's error line, else the exit code."""
    lines: List[str] = []
    for name in ["lmsrun.log"] + sorted(f for f in os.listdir(out_dir) if f.startswith("rank")):
        try:
            with open(os.path.join(out_dir, name), encoding="utf-8", errors="replace") as handle:
                lines += handle.read().splitlines()
        except OSError:
            continue
    for line in lines:
        if "out of memory" in line.lower() or "OutOfMemoryError" in line:
            return "out of memory"
    if outcome:
        return outcome[:160]
    for pattern in (r"\[lmsdp\] rank \d+ failed: .*", r"lmsrun: error: .*"):
        for line in lines:
            match = re.search(pattern, line)
            if match:
                return match.group(0)[:160]
    return f"exit code {code}"

# --------------------------------------------------------------------------------------------
