"""The pure search of ``lmsrun tune``: the space (ranks, threads, inter-op threads, batch per rank,
binding), the scaling models fitted to measured trials, the staged search that decides what to measure
next, and the final choice. Trials come from a runner (``tune.TrialRunner`` launches real jobs; tests
pass their own), so everything here runs without starting a process.

Search (workload-aware parallelisation: fit a scaling model to a few trials, measure only where the
model says a setting could win):
1. ranks x threads at the config's batch. The uniform rule (config's ranks, cores / ranks threads)
   first, then anchors (1 rank x all cores, 1 x 1, all ranks x 1). A linear model of one step's
   time, ``T = A + B / threads + C (ranks - 1)`` (Amdahl per rank plus a cost per extra rank:
   allreduce and shared memory bandwidth), is fitted by least squares to every measured trial;
   the unmeasured setting with the best predicted samples/s (ranks x batch / T) is measured next,
   until none is predicted to beat the best measured by ``MARGIN``.
2. batch per rank at the best ranks x threads: doubling while ``T = F + S x batch`` (fitted) predicts
   a gain above ``MARGIN``; the ceiling is the planner's largest batch when a planner is installed,
   else ``--max-batch`` (default 4 x the config's) or the first failed trial (out of memory).
3. inter-op threads 1 vs torch's default, and ``--bind-to core`` vs ``none`` (not for one rank, which
   runs in place): one trial each; kept only when better by ``MARGIN`` in every reading.
4. confirm: the best of many single readings is biased up, so while the runner-up is within
   ``2 x MARGIN`` of a best read once, the best is read again (at most twice in all); ranked on means.
``--exhaustive`` measures the whole space instead (the benchmark's reference).
GPU runs: one rank per GPU, fixed; only the CPU side (threads, inter-op, binding) and the batch vary.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

MARGIN = 0.05  # a setting must beat the best by this much (measured, or predicted) to be kept / tried
BINDINGS = ("none", "core")
SLACK_S = 3.0  # tune's own work after the last trial (writing and checking the config)


@dataclass(frozen=True)
class Setting:
    """One point of the search space."""

    np: int
    threads: int
    interop: int = 0  # 0: torch's default
    batch: int = 1
    bind: str = "none"

    def cells(self) -> List[str]:
        return [str(self.np), str(self.threads), str(self.interop or "dflt"), str(self.batch), self.bind]


@dataclass
class Trial:
    setting: Setting
    predicted: Optional[float] = None
    samples_per_s: Optional[float] = None
    wall_s: float = 0.0
    note: str = ""
    error: Optional[str] = None
    rates: List[float] = field(default_factory=list)  # every measurement of this setting (re-measures too)
    number: int = 0  # the row in tune's table where it was first measured
    backend: str = ""  # the comm backend its ranks ran (their summary.json), e.g. horovod under 'auto'

    @property
    def ok(self) -> bool:
        return self.samples_per_s is not None


# --------------------------------------------------------------------------------------------
# scaling models (pure: fitted to trials, tested without running anything)


def least_squares(rows: List[List[float]], values: List[float]) -> List[float]:
    """Minimum-norm least-squares coefficients (fewer points than unknowns is fine: the model is then
    refined as trials come in)."""
    import torch

    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    return [float(v) for v in (torch.linalg.pinv(x) @ y).flatten()]


class StepModel:
    """Step time of one rank at fixed batch: ``T(ranks, threads) = A + B / threads + C (ranks - 1)``,
    least squares over measured trials; samples/s = ranks x batch / T."""

    def __init__(self) -> None:
        self.coef: Optional[Tuple[float, float, float]] = None

    def fit(self, trials: Sequence[Trial]) -> bool:
        rows = [(t.setting, t.setting.np * t.setting.batch / t.samples_per_s) for t in trials if t.ok]
        if len(rows) < 2:
            return False
        a, b, c = least_squares([[1.0, 1.0 / s.threads, s.np - 1.0] for s, _ in rows], [step for _, step in rows])
        self.coef = (a, max(b, 0.0), max(c, 0.0))  # threads and ranks never make a step longer by themselves
        return True

    def step_time(self, s: Setting) -> float:
        assert self.coef is not None
        a, b, c = self.coef
        return max(a + b / s.threads + c * (s.np - 1), 1e-9)

    def predict(self, s: Setting) -> float:
        return s.np * s.batch / self.step_time(s)

    def serial_share(self) -> float:
        """Share of a one-thread step that more threads do not shorten (Amdahl's serial fraction)."""
        assert self.coef is not None
        a, b, _ = self.coef
        return max(0.0, a) / max(a + b, 1e-12)


class BatchModel:
    """Step time against batch at fixed ranks x threads: ``T = F + S x batch`` (fixed per-step cost:
    allreduce, optimizer, Python; per-sample cost S); samples/s = ranks x batch / T."""

    def __init__(self) -> None:
        self.coef: Optional[Tuple[float, float]] = None

    def fit(self, trials: Sequence[Trial]) -> bool:
        rows = [(t.setting.batch, t.setting.np * t.setting.batch / t.samples_per_s) for t in trials if t.ok]
        if len({b for b, _ in rows}) < 2:
            return False
        fixed, per_sample = least_squares([[1.0, float(b)] for b, _ in rows], [t for _, t in rows])
        self.coef = (max(fixed, 0.0), max(per_sample, 1e-12))
        return True

    def predict(self, s: Setting) -> float:
        assert self.coef is not None
        fixed, per_sample = self.coef
        return s.np * s.batch / (fixed + per_sample * s.batch)


# --------------------------------------------------------------------------------------------
# the space


def core_binding(threads: int) -> str:
    """mpirun flags that bind each rank to ``threads`` cores (trials, the written config, the benchmark)."""
    return f"--map-by slot:PE={threads} --bind-to core"


@dataclass
class Space:
    """What may vary: rank counts, threads per rank for a rank count, batches, inter-op, bindings."""

    cores: int
    ranks: List[int]
    batch0: int
    max_batch: int
    gpu: bool = False
    most_ranks: int = 0  # the most ranks this machine or allocation gives (0: the cores)

    def threads_for(self, np_: int) -> List[int]:
        share = max(1, self.cores // np_)
        counts = {share}
        t = 1
        while t < share:
            counts.add(t)
            t *= 2
        return sorted(counts)

    def bindings(self, np_: int) -> Tuple[str, ...]:
        """One rank runs in place without mpirun, and GPU ranks are placed by the GPU: nothing to bind."""
        return ("none",) if self.gpu or np_ == 1 else BINDINGS

    def size(self) -> int:
        """Settings in the whole space (what ``--exhaustive`` measures)."""
        return sum(len(self.batches()) * 2 * len(self.bindings(n)) for n, _ in self.grid())

    def grid(self) -> List[Tuple[int, int]]:
        return [(n, t) for n in self.ranks for t in self.threads_for(n)]

    def batches(self) -> List[int]:
        out, b = [], self.batch0
        while b <= self.max_batch:
            out.append(b)
            b *= 2
        if out and out[-1] < self.max_batch:
            out.append(self.max_batch)  # the largest that fits is worth a trial of its own
        return out or [self.batch0]


class TrialSource(Protocol):
    """What the Tuner measures with: one Setting in, one Trial out (``tune.TrialRunner`` launches a
    real job; an optional ``interrupted`` attribute set True stops the search)."""

    def run(self, setting: Setting) -> Trial: ...


# --------------------------------------------------------------------------------------------
# the search


class Tuner:
    """Runs the model-guided search (or the exhaustive sweep) and keeps every trial in order."""

    def __init__(self, space: Space, base: Setting, runner: TrialSource, budget_s: float, started: float,
                 printer: Any) -> None:
        self.space, self.base, self.runner = space, base, runner
        self.budget_s, self.started, self.printer = budget_s, started, printer
        self.trials: List[Trial] = []  # one per setting, in the order first measured
        self.runs = 0  # launches, re-measures included
        self.stopped: str = ""
        self.step_model, self.batch_model = StepModel(), BatchModel()
        self.notes: Dict[str, str] = {}

    # ---- budget

    def _cost_estimate(self) -> float:
        walls = [t.wall_s for t in self.trials]
        return statistics.median(walls) if walls else 0.0

    def _fits_budget(self) -> bool:
        """False (and ``stopped`` says why) when the next trial would overrun the budget."""
        if self.stopped:
            return False
        left = self.started + self.budget_s - SLACK_S - time.monotonic()
        estimate = self._cost_estimate()
        if self.trials and estimate > left:
            self.stopped = (f"time budget: the next trial would take ~{estimate:.0f} s, {max(left, 0):.0f} s left "
                            f"(estimated from the trials so far)")
            return False
        return True

    def _launch(self, setting: Setting) -> Trial:
        self.runs += 1
        trial = self.runner.run(setting)
        if trial.samples_per_s is not None:
            trial.rates = [trial.samples_per_s]
        if getattr(self.runner, "interrupted", False):
            self.stopped = "interrupted"
        return trial

    def measure(self, setting: Setting, predicted: Optional[float], note: str = "") -> Optional[Trial]:
        """Run a trial unless it was run already, the budget cannot hold it, or the user stopped us."""
        for trial in self.trials:
            if trial.setting == setting:
                return trial
        if not self._fits_budget():
            return None
        trial = self._launch(setting)
        trial.predicted = predicted
        if note and not trial.note:
            trial.note = note
        trial.number = self.runs
        self.trials.append(trial)
        self.printer(self.runs, trial)
        return trial

    def remeasure(self, trial: Trial) -> bool:
        """Measure ``trial``'s setting once more; its figure becomes the mean of all its measurements."""
        if not trial.ok or not self._fits_budget():
            return False
        again = self._launch(trial.setting)
        again.predicted = trial.samples_per_s
        if not again.ok:
            again.note = again.note or "re-measure failed"
            self.printer(self.runs, again)
            return False
        trial.rates.append(again.samples_per_s)  # type: ignore[arg-type]
        trial.samples_per_s = statistics.fmean(trial.rates)
        again.note = f"re-measure of #{trial.number}: mean of {len(trial.rates)} now " \
                     f"{trial.samples_per_s:.1f}"
        self.printer(self.runs, again)
        return True

    def best(self, where: Any = None) -> Optional[Trial]:
        ok = [t for t in self.trials if t.ok and (where is None or where(t.setting))]
        return max(ok, key=lambda t: t.samples_per_s) if ok else None  # type: ignore[arg-type,return-value]

    # ---- model-guided

    def search(self) -> None:
        space, base = self.space, self.base
        first = self.measure(base, None, "uniform rule (the config)")
        if first is None or not first.ok:
            return
        top = max(space.threads_for(1)) if not space.gpu else max(space.threads_for(space.ranks[0]))
        anchors = ([(1, top), (1, 1), (space.cores, 1)] if not space.gpu else
                   [(space.ranks[0], 1)])
        for n, t in anchors:
            if (n, t) in space.grid():
                self.measure(replace(base, np=n, threads=t), self._predict_step(n, t), "anchor for the model")
        same_batch = lambda s: s.batch == base.batch and s.interop == base.interop and s.bind == base.bind  # noqa: E731
        while not self.stopped:
            done = {(t.setting.np, t.setting.threads) for t in self.trials if same_batch(t.setting)}
            if not self.step_model.fit([t for t in self.trials if same_batch(t.setting)]):
                break
            left = [(n, t) for n, t in space.grid() if (n, t) not in done]
            best = self.best(same_batch)
            if not left or best is None:
                break
            n, t = max(left, key=lambda nt: self.step_model.predict(replace(base, np=nt[0], threads=nt[1])))
            guess = self.step_model.predict(replace(base, np=n, threads=t))
            if guess < best.samples_per_s * (1 + MARGIN):  # type: ignore[operator]
                self.notes["grid"] = (f"{len(left)} of {len(space.grid())} ranks x threads settings not run: "
                                      f"the model predicts none beats the best by {MARGIN:.0%} "
                                      f"(best unmeasured: {n} x {t} at {guess:.1f} samples/s)")
                break
            self.measure(replace(base, np=n, threads=t), guess, "model's best guess")
        self.step_model.fit([t for t in self.trials if same_batch(t.setting)])
        self._batch_stage()
        self._switch_stage("interop", lambda s: replace(s, interop=1), "inter-op threads 1")
        best = self.best()
        if best is not None and len(space.bindings(best.setting.np)) > 1:
            self._switch_stage("bind", lambda s: replace(s, bind="core"), "--bind-to core")
        self._confirm_stage()

    def _confirm_stage(self, limit: int = 2) -> None:
        """The best of many single short readings is biased up (the winner's curse): while the runner-up
        is within ``2 x MARGIN`` of a best that was read only once, read the best again (at most
        ``limit`` times in all) and rank on the means."""
        again: List[Trial] = []
        for _ in range(limit):
            ok = sorted((t for t in self.trials if t.ok), key=lambda t: -(t.samples_per_s or 0.0))
            if len(ok) < 2 or len(ok[0].rates) > 1 or \
                    ok[1].samples_per_s < ok[0].samples_per_s * (1 - 2 * MARGIN):  # type: ignore[operator]
                break
            if not self.remeasure(ok[0]):
                break
            again.append(ok[0])
        if again:
            self.notes["confirm"] = (f"re-measured {', '.join(f'#{t.number}' for t in again)}: the best read once "
                                     f"and the runner-up within {2 * MARGIN:.0%}; ranked on the means")

    def _predict_step(self, n: int, t: int) -> Optional[float]:
        same = [x for x in self.trials if x.setting.batch == self.base.batch]
        if self.step_model.fit(same):
            return self.step_model.predict(replace(self.base, np=n, threads=t))
        return None

    def _batch_stage(self) -> None:
        best = self.best()
        if best is None:
            return
        at = best.setting
        for batch in self.space.batches():
            if batch <= at.batch or self.stopped:
                continue
            line = [t for t in self.trials if replace(t.setting, batch=at.batch) == at]
            predicted = self.batch_model.predict(replace(at, batch=batch)) if self.batch_model.fit(line) else None
            current = self.best(lambda s: replace(s, batch=at.batch) == at)
            if predicted is not None and current is not None and \
                    predicted < current.samples_per_s * (1 + MARGIN):  # type: ignore[operator]
                self.notes["batch"] = (f"batch {batch} not run: the model (fixed {self.batch_model.coef[0] * 1e3:.1f} ms "  # type: ignore[index]
                                       f"+ {self.batch_model.coef[1] * 1e3:.2f} ms/sample per step) predicts "  # type: ignore[index]
                                       f"{predicted:.1f} samples/s, less than {MARGIN:.0%} above the best")
                break
            trial = self.measure(replace(at, batch=batch), predicted, "larger batch")
            if trial is None:
                break
            if not trial.ok:
                self.notes["batch"] = f"batch {batch} failed ({trial.error}): the ceiling"
                break

    def _switch_stage(self, key: str, change: Any, what: str) -> None:
        best = self.best()
        if best is None or self.stopped:
            return
        trial = self.measure(change(best.setting), best.samples_per_s, what)
        if trial is not None and not trial.ok:
            self.notes[key] = f"{what} failed: {trial.error}"

    # ---- exhaustive

    def sweep(self) -> None:
        for n, t in self.space.grid():
            for batch in self.space.batches():
                for interop in (0, 1):
                    for bind in self.space.bindings(n):
                        self.measure(Setting(n, t, interop, batch, bind), None)
                        if self.stopped:
                            return


def choose(tuner: Tuner) -> Optional[Trial]:
    """The best trial; an inter-op or binding change counts only when it beats its twin by MARGIN in
    every measurement (its slowest reading against the twin's fastest): a default is not given up on
    a lucky reading."""
    best = tuner.best()
    if best is None:
        return None
    s = best.setting
    for field_name, default in (("interop", 0), ("bind", "none")):
        if getattr(s, field_name) != default:
            twin = next((t for t in tuner.trials if t.ok and t.setting == replace(s, **{field_name: default})), None)
            if twin is not None and min(_readings(best)) < max(_readings(twin)) * (1 + MARGIN):
                best, s = twin, twin.setting
    return best


def _readings(trial: Trial) -> List[float]:
    return trial.rates or [trial.samples_per_s]  # type: ignore[list-item]


__all__ = ["MARGIN", "BINDINGS", "core_binding", "SLACK_S", "Setting", "Trial", "least_squares", "StepModel", "BatchModel", "Space",
           "TrialSource", "Tuner", "choose"]
