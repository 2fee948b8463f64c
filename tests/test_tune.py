"""lmsrun tune: the scaling models, the flags, and a real tuning run on the quickstart config that
keeps to its time budget, explains every knob and writes a config that loads and runs."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from lmsdp.launcher.config import load_config
from tests.support import ENV, Run, assert_no_leftovers, rank_process
from lmsdp.launcher.tools.tune import parse_duration
from lmsdp.launcher.tools.tune_search import BatchModel, Setting, Space, StepModel, Trial, Tuner, choose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
SMALL = ["--set", "model.kwargs={width: 8, num_classes: 10, stem: cifar}", "--set", "data.shape=[3, 16, 16]",
         "--set", "swap.enabled=false", "--set", "comm.backend=torch"]


def _trial(np_, threads, batch, step_s):
    return Trial(Setting(np_, threads, 0, batch, "none"), samples_per_s=np_ * batch / step_s)


def test_step_model_recovers_amdahl_and_rank_cost():
    a, b, c = 0.010, 0.040, 0.005  # seconds: serial, parallel (one thread), per extra rank
    trials = [_trial(n, t, 16, a + b / t + c * (n - 1)) for n, t in [(1, 1), (1, 4), (4, 1), (2, 2)]]
    model = StepModel()
    assert model.fit(trials)
    assert model.coef == pytest.approx((a, b, c), rel=1e-6)
    assert model.serial_share() == pytest.approx(a / (a + b))
    assert model.predict(Setting(8, 1, 0, 16)) == pytest.approx(8 * 16 / (a + b + 7 * c))


def test_batch_model_predicts_the_fixed_cost_amortised():
    model = BatchModel()
    assert model.fit([_trial(2, 1, 16, 0.02 + 16 * 0.001), _trial(2, 1, 32, 0.02 + 32 * 0.001)])
    assert model.predict(Setting(2, 1, 0, 64)) == pytest.approx(2 * 64 / (0.02 + 0.064))


def test_space_keeps_ranks_times_threads_within_the_cores():
    space = Space(cores=16, ranks=list(range(1, 17)), batch0=8, max_batch=32)
    assert all(n * t <= 16 for n, t in space.grid())
    assert space.threads_for(1) == [1, 2, 4, 8, 16] and space.threads_for(3) == [1, 2, 4, 5]
    assert space.batches() == [8, 16, 32]


def test_durations():
    assert parse_duration("120s") == 120 and parse_duration("2m") == 120 and parse_duration("90") == 90
    for bad in ("abc", "0s", "-5", "12q"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


@pytest.mark.integration
@pytest.mark.parametrize("argv, words", [
    (["tune"], "the following arguments are required: config"),
    (["tune", QUICKSTART, "--time-budget", "soon"], "--time-budget: expected a duration"),
    (["tune", QUICKSTART, "--trial-steps", "0"], "--trial-steps: expected a positive integer"),
    (["tune", QUICKSTART, "--warmup", "9"], "--warmup: expected 0 to 5"),
    (["tune", QUICKSTART, "--write", "/tmp"], "--write: /tmp is a directory"),
    (["tune", QUICKSTART, "--bogus"], "unrecognized arguments: --bogus"),
    (["tune", QUICKSTART, "--ranks", "0,2"], "--ranks: expected a comma list of positive rank counts"),
    (["tune", QUICKSTART, "--ranks", "4096"], "--ranks: 4096 ranks exceed the"),
    (["tune", QUICKSTART, "--set", "launch.threads=many"], "launch.threads: 'many' is not allowed"),
    (["tune", "missing.yaml"], "config file not found: missing.yaml"),
])
def test_bad_flags_are_one_line_errors(argv, words):
    proc = subprocess.run([LMSRUN] + argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmsrun: error: ") and words in lines[0], proc.stderr


@pytest.mark.integration
@pytest.mark.mpi
def test_tune_quickstart_keeps_its_budget_explains_and_writes_a_runnable_config(tmp_path):
    budget = 30
    out = tmp_path / "tuned.yaml"
    started = time.monotonic()
    proc = subprocess.run([LMSRUN, "tune", QUICKSTART, "--time-budget", f"{budget}s", "--trial-steps", "3",
                           "--warmup", "1", "--write", str(out)] + SMALL,
                          capture_output=True, text=True, timeout=budget + 60, cwd=tmp_path)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert wall <= budget + 10, f"tune took {wall:.0f} s for a {budget} s budget\n{proc.stdout}"
    text = proc.stdout
    assert "uniform rule (the config)" in text and "best: #" in text
    why = text.split("why:\n", 1)[1].splitlines()
    for knob in ("launch.np = ", "launch.threads = ", "launch.interop_threads = ", "train.batch_size = "):
        assert sum(line.strip().startswith(knob) for line in why) == 1, text
    assert any(line.strip().startswith(("binding = ", "launch.mpi_args = ")) for line in why), text
    tuned = load_config(str(out))  # loads and validates
    assert tuned.train.batch_size >= 16 and tuned.launch.np >= 1 and isinstance(tuned.launch.threads, int)
    run = subprocess.run([LMSRUN, str(out), "--set", "train.steps=2", "--set", "train.progress=false",
                          "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "run" / "summary.json").exists()


class _ScriptedRunner:
    """Stands in for the trial launcher in tests of the search logic only (the real launches are
    tested below): each setting reads the next figure of its list."""

    def __init__(self, figures):
        self.figures = {k: list(v) for k, v in figures.items()}
        self.launched = []

    def run(self, setting):
        self.launched.append(setting)
        figures = self.figures[(setting.np, setting.threads)]  # the last figure repeats
        return Trial(setting, samples_per_s=figures.pop(0) if len(figures) > 1 else figures[0], wall_s=0.01)


def test_confirm_stage_picks_on_the_mean_when_the_best_two_are_close():
    # 1x2 reads lucky once (110) and then 80; 2x1 reads 100 twice: the mean decides for 2x1
    runner = _ScriptedRunner({(2, 1): [100.0, 100.0], (1, 2): [110.0, 80.0], (1, 1): [40.0]})
    base = Setting(2, 1, 0, 16, "none")
    tuner = Tuner(Space(2, [1, 2], 16, 16), base, runner, budget_s=600, started=time.monotonic(),
                  printer=lambda *_: None)
    for setting in (base, Setting(1, 2, 0, 16, "none"), Setting(1, 1, 0, 16, "none")):
        tuner.measure(setting, None)
    tuner._confirm_stage()
    pick = choose(tuner)
    assert (pick.setting.np, pick.setting.threads) == (2, 1)
    assert pick.rates == [100.0, 100.0] and tuner.runs == 5
    assert tuner.notes["confirm"].startswith("re-measured #2, #1: the best read once")


def test_confirm_stage_is_skipped_when_the_best_is_clear():
    runner = _ScriptedRunner({(2, 1): [100.0], (1, 2): [60.0]})
    tuner = Tuner(Space(2, [1, 2], 16, 16), Setting(2, 1, 0, 16), runner, 600, time.monotonic(), lambda *_: None)
    tuner.measure(Setting(2, 1, 0, 16), None)
    tuner.measure(Setting(1, 2, 0, 16), None)
    tuner._confirm_stage()
    assert tuner.runs == 2 and "confirm" not in tuner.notes


def test_the_batch_ceiling_comes_from_the_planner_when_memory_bounds_it():
    from lmsdp.launcher.tools.plan import largest_batch
    from lmsdp.launcher.tools.tune import make_space

    config = load_config(QUICKSTART, ["swap.memory_target=64MiB", "swap.enabled=true"])
    largest, why = largest_batch(config)
    space, source = make_space(config, None)
    assert space.max_batch == largest > config.train.batch_size and "swap planner's largest batch" in source
    assert space.batches()[-1] == largest  # the largest that fits gets a trial of its own
    unbounded, why = make_space(load_config(QUICKSTART), None)  # CPU, no memory target: 4 x the batch
    assert unbounded.max_batch == 4 * load_config(QUICKSTART).train.batch_size and "swap.memory_target" in why
    assert make_space(config, 20)[0].max_batch == 20  # --max-batch wins


def test_a_non_default_switch_must_win_in_every_reading():
    # inter-op 1 read 130 once (lucky) and 117 once; its default twin 116 and 113: the means differ by 8 %,
    # but the slowest inter-op reading is not 5 % above the fastest default one, so the default stays
    runner = _ScriptedRunner({(2, 1): [116.0, 117.0]})
    tuner = Tuner(Space(2, [1, 2], 16, 16), Setting(2, 1, 0, 16), runner, 600, time.monotonic(), lambda *_: None)
    default = tuner.measure(Setting(2, 1, 0, 16), None)
    switched = tuner.measure(Setting(2, 1, 1, 16), None)
    default.rates, switched.rates = [116.0, 113.0], [117.0, 130.0]
    default.samples_per_s, switched.samples_per_s = 114.5, 123.5
    assert choose(tuner) is default
    switched.rates = [125.0, 130.0]  # wins in every reading by > 5 %: kept
    assert choose(tuner) is switched


@pytest.mark.integration
@pytest.mark.mpi
def test_tune_refuses_to_run_as_a_rank(tmp_path):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(["mpirun", "-np", "1", LMSRUN, "tune", QUICKSTART],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lmsrun:")]
    assert lines == ["lmsrun: error: tune: this process is rank 0 of 1 started by openmpi; tune launches its own "
                     "trials: run 'lmsrun tune CONFIG' once, not under mpirun/srun/torchrun"], proc.stderr


def test_one_rank_has_no_binding_to_try():
    space = Space(cores=2, ranks=[1, 2], batch0=16, max_batch=64)
    assert space.bindings(1) == ("none",) and space.bindings(2) == ("none", "core")
    assert space.size() == 3 * 2 * 1 + 3 * 2 * 1 + 3 * 2 * 2  # 1x1, 1x2 unbound; 2x1 both bindings
    runner = _ScriptedRunner({(1, 1): [200.0], (1, 2): [100.0], (2, 1): [90.0]})
    tuner = Tuner(space, Setting(1, 1, 0, 16), runner, 600, time.monotonic(), lambda *_: None)
    tuner.sweep()
    assert tuner.runs == space.size() and all(s.bind == "none" for s in runner.launched if s.np == 1)


def _tune_run(tmpdir: str, *extra: str) -> Run:
    """lmsrun tune on the small quickstart with long trials, temp folders in ``tmpdir``."""
    return Run("tune", QUICKSTART, "--time-budget", "150s", "--trial-steps", "40", "--warmup", "1", *SMALL, *extra,
               env=dict(ENV, TMPDIR=tmpdir))


def _short_tmpdir(tmp_path):  # Open MPI's session sockets need a short path
    import tempfile

    return tempfile.mkdtemp(prefix="lt", dir="/tmp")


@pytest.mark.integration
@pytest.mark.mpi
def test_a_trial_whose_rank_is_killed_fails_and_tuning_goes_on(tmp_path):
    import shutil
    import signal

    tmpdir = _short_tmpdir(tmp_path)
    run = _tune_run(tmpdir, "--max-batch", "16")
    try:
        run.wait_for(lambda: any(t.startswith("  1 ") for _, _, t in run.lines))  # the first trial's row
        run.wait_for(lambda: _has_rank(run))
        rank_process(run, 0).send_signal(signal.SIGKILL)  # the second trial's rank
        assert run.wait(timeout=240) == 0, run.text()
        row = next(t for _, _, t in run.lines if t.startswith("  2 "))
        assert " failed " in row and row.endswith("rank 0 was killed by signal 9 (SIGKILL)"), run.text()
        assert "best: #" in run.text() and "best: #2 " not in run.text()
        assert_no_leftovers(run)
        assert not [n for n in os.listdir(tmpdir) if n.startswith("lmsrun-tune-")]  # its trials' folder is gone
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _has_rank(run: Run) -> bool:
    try:
        rank_process(run, 0)
        return True
    except AssertionError:
        return False


@pytest.mark.integration
@pytest.mark.mpi
def test_ctrl_c_stops_tuning_with_the_best_so_far(tmp_path):
    import shutil
    import signal

    tmpdir = _short_tmpdir(tmp_path)
    run = _tune_run(tmpdir)
    try:
        run.wait_for(lambda: any(t.startswith("  1 ") for _, _, t in run.lines))
        run.wait_for(lambda: _has_rank(run))
        run.proc.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 130, run.text()
        text = run.text()
        row = next(t for _, _, t in run.lines if t.startswith("  2 "))
        assert " stopped " in row and row.endswith("interrupted"), text
        assert "stopped: interrupted" in text and "best: #1 " in text, text
        assert_no_leftovers(run)
        assert not [n for n in os.listdir(tmpdir) if n.startswith("lmsrun-tune-")]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _tune_and_run(tmp_path, *extra: str, prefix=(), budget: int = 40):
    """``lmsrun tune`` on the small quickstart (--json, --write), then the written config for 2 steps;
    both under ``prefix`` (e.g. taskset)."""
    out, report = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    proc = subprocess.run([*prefix, LMSRUN, "tune", QUICKSTART, "--time-budget", f"{budget}s", "--trial-steps", "3",
                           "--warmup", "1", "--max-batch", "16", "--write", str(out), "--json", str(report),
                           *SMALL, *extra], capture_output=True, text=True, timeout=budget + 90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    trials = json.loads(report.read_text())["trials"]
    run = subprocess.run([*prefix, LMSRUN, str(out), "--set", "train.steps=2", "--set", "train.progress=false",
                          "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return proc.stdout, trials, json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.integration
@pytest.mark.mpi
def test_tune_measures_horovod_trials_and_writes_a_horovod_config(tmp_path):
    pytest.importorskip("horovod.torch")
    text, trials, summary = _tune_and_run(tmp_path, "--set", "comm.backend=horovod")
    ok = [t for t in trials if t["samples_per_s"]]
    assert ok and {t["backend"] for t in ok} == {"horovod"}, text
    assert any(t["np"] == 2 for t in ok), text  # the uniform rule of the config: 2 ranks allreducing
    assert summary["comm_backend"] == "horovod" and "best: #" in text


@pytest.mark.integration
@pytest.mark.mpi
def test_tune_keeps_to_the_cpus_it_is_bound_to(tmp_path):
    """taskset (or a cgroup) leaves one CPU: one rank of one thread, not the machine's core count."""
    import shutil

    if not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and 2 CPUs")
    cpu = min(os.sched_getaffinity(0))
    text, trials, summary = _tune_and_run(tmp_path, "--exhaustive", prefix=("taskset", "-c", str(cpu)), budget=30)
    assert "on 1 core(s) (CPU; bound to 1 CPU(s), at most 1 rank(s))" in text, text
    assert trials and {(t["np"], t["threads"]) for t in trials} == {(1, 1)}, text
    assert summary["ranks"] == 1
