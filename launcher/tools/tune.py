"""``lmsrun tune CONFIG``: choose ranks per node, threads, inter-op threads, batch per rank and the
binding by measurement, inside a time budget.

    lmsrun tune CONFIG [--time-budget 120s] [--write FILE] [--trial-steps N] [--max-batch N] [--ranks 1,2,4]
                       [--exhaustive] [--set k=v ..]

Every trial is a real job (``tune_trials``).

The search itself (the space, the scaling models, the stages and the choice) is pure and lives in
``tune_search``; this module builds the space for the machine, runs trials, explains the pick and
writes the config.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from lmsdp.launcher.config.argtypes import OneLineParser, positive_int, rank_list
from lmsdp.launcher.config.errors import UserError
from .tune_search import MARGIN, SLACK_S, Setting, Space, Trial, Tuner, choose, core_binding
from .tune_trials import TrialRunner


def planner_ceiling(config: Any) -> Tuple[Optional[int], str]:
    """The planner's largest batch that fits; a planner failure must not stop tuning."""
    from .plan import largest_batch

    try:
        return largest_batch(config)
    except UserError as exc:  # its first clause says what is wrong; the advice after ';' is the planner's
        return None, f"planner: {str(exc).split('; ')[0]}"
    except Exception as exc:  # noqa: BLE001 - e.g. a model the fake-tensor profile cannot run
        return None, f"planner failed ({type(exc).__name__}: {str(exc)[:80]})"


def local_limits() -> Tuple[int, Optional[int], str]:
    """(cores, rank ceiling or None, where they came from) for trials on this machine: its physical
    cores, fewer when this process is bound to fewer CPUs (a cgroup, taskset) or runs inside a Slurm
    allocation (its CPUs on this node; its task count caps the ranks, as mpirun takes its slots from it)."""
    from lmsdp.runtime.topology import slurm_allocation

    from lmsdp.launcher.launch.mpi_command import physical_cores

    cores, notes = physical_cores(), []
    try:
        bound = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        bound = cores
    if bound < cores:
        cores = bound
        notes.append(f"bound to {bound} CPU(s)")
    allocation = slurm_allocation()
    if allocation is None:
        return cores, None, "; ".join(notes)
    cores = min(cores, allocation.cpus)
    notes.append(allocation.describe())
    return cores, allocation.tasks, "; ".join(notes)


def make_space(config: Any, max_batch: Optional[int], ranks: Optional[List[int]] = None) -> Tuple[Space, str]:
    """The space for this machine and config (``ranks``: the rank counts to try, default 1 to the most
    this machine or allocation gives); the second value says where the batch ceiling came from."""
    import torch

    cores, task_ceiling, _ = local_limits()
    most_ranks = cores if task_ceiling is None else min(cores, task_ceiling)
    batch0 = config.train.batch_size
    if max_batch is not None:
        ceiling, source = max_batch, "--max-batch"
    else:
        ceiling, source = planner_ceiling(config)
    if ceiling is None:
        ceiling, source = 4 * batch0, f"4 x the config's batch: {source}; a failed trial (out of memory) also stops it"
    elif ceiling < batch0:
        source += f"; below the config's batch {batch0}, which is tried as given"
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count() if task_ceiling is None else min(torch.cuda.device_count(), task_ceiling)
        if ranks:
            raise UserError(f"--ranks: GPU runs use one rank per GPU ({gpus} here); --ranks is for CPU runs")
        return Space(cores, [gpus], batch0, max(ceiling, batch0), gpu=True, most_ranks=gpus), source
    if ranks and max(ranks) > most_ranks:
        raise UserError(f"--ranks: {max(ranks)} ranks exceed the {most_ranks} this machine gives "
                        f"({cores} core(s){'' if task_ceiling is None else f', {task_ceiling} task(s)'}); "
                        f"allowed: 1 to {most_ranks}")
    return Space(cores, ranks or list(range(1, most_ranks + 1)), batch0, max(ceiling, batch0),
                 most_ranks=most_ranks), source



# --------------------------------------------------------------------------------------------
# explanation and output


def explain(tuner: Tuner, pick: Trial, base: Setting, space: Space, batch_source: str) -> List[str]:
    """One line per knob: the value and why."""
    s, rate = pick.setting, pick.samples_per_s or 0.0
    ok = [t for t in tuner.trials if t.ok]
    base_trial = next((t for t in ok if t.setting == base), None)

    def rate_of(pred: Any) -> str:
        found = [t for t in ok if pred(t.setting)]
        if not found:
            return "not measured"
        top = max(found, key=lambda t: t.samples_per_s)  # type: ignore[arg-type,return-value]
        return f"{top.samples_per_s:.1f} samples/s ({'x'.join(top.setting.cells()[:2])})"

    lines = []
    gain = f"{rate / base_trial.samples_per_s - 1:+.0%} vs the uniform rule" if base_trial else "the uniform rule not measured"
    model = tuner.step_model
    fit = ""
    if model.coef is not None:
        a, b, c = model.coef
        fit = (f"; fit T = {a * 1e3:.1f} + {b * 1e3:.1f}/threads + {c * 1e3:.1f} x (ranks-1) ms: "
               f"serial share {model.serial_share():.0%}")
    def against(pred: Any) -> str:
        """The best other setting at the pick's batch, else at the config's batch beside the pick's shape."""
        text = rate_of(lambda x: pred(x) and x.batch == s.batch)
        if text != "not measured" or s.batch == base.batch:
            return text
        mine = rate_of(lambda x: (x.np, x.threads) == (s.np, s.threads) and x.batch == base.batch)
        return f"at batch {base.batch}: {rate_of(lambda x: pred(x) and x.batch == base.batch)} vs {mine}"

    if space.gpu:
        lines.append(f"launch.np = {s.np}: one rank per GPU ({s.np} GPU(s)), fixed")
    elif len(space.ranks) == 1:
        lines.append(f"launch.np = {s.np}: the only rank count here ({space.cores} core(s)); measured "
                     f"{rate:.1f} samples/s ({gain})")
    else:
        others = against(lambda x: x.np != s.np)
        lines.append(f"launch.np = {s.np}: best measured {rate:.1f} samples/s ({gain}); best other rank count "
                     f"{others}{fit}")
    share = max(1, space.cores // s.np)
    if len(space.threads_for(s.np)) == 1:
        lines.append(f"launch.threads = {s.threads}: the only count that fits: {space.cores} core(s) / {s.np} rank(s)")
    else:
        others = against(lambda x: x.np == s.np and x.threads != s.threads)
        lines.append(f"launch.threads = {s.threads}: of the rank's share of {share} core(s); "
                     f"other counts at {s.np} rank(s): {others}")
    same_shape = lambda x: (x.np, x.threads) == (s.np, s.threads)  # noqa: E731
    twin = _closest(ok, s, lambda x: same_shape(x) and x.interop != s.interop)
    twin_text = (f"{twin.setting.interop or 'default'} measured {twin.samples_per_s:.1f} samples/s "
                 f"({twin.samples_per_s / rate - 1:+.1%}); a change is kept only beyond {MARGIN:.0%}"
                 if twin else "other values not measured")
    lines.append(f"launch.interop_threads = {s.interop}{' (torch default)' if s.interop == 0 else ''}: {twin_text}")
    note = tuner.notes.get("batch", "")
    by_batch: Dict[int, float] = {}
    for t in ok:
        if same_shape(t.setting):
            by_batch[t.setting.batch] = max(by_batch.get(t.setting.batch, 0.0), t.samples_per_s or 0.0)
    seen = ", ".join(f"{b}: {r:.1f}" for b, r in sorted(by_batch.items()))
    glob = ""
    if s.batch * s.np != base.batch * base.np:
        glob = (f"; global batch {base.np * base.batch} -> {s.np * s.batch}: rescale optimizer.lr "
                "(e.g. linearly) if the run's accuracy matters")
    lines.append(f"train.batch_size = {s.batch}: best samples/s by batch at {s.np}x{s.threads}: {seen or 'none'}; "
                 f"ceiling {space.max_batch} from {batch_source}{'; ' + note if note else ''}{glob}")
    if not space.gpu and s.np == 1:
        lines.append("binding = none: one rank runs in place without mpirun, so there is nothing to bind")
    elif not space.gpu:
        twin = _closest(ok, s, lambda x: same_shape(x) and x.bind != s.bind)
        other = (f"--bind-to {twin.setting.bind} measured {twin.samples_per_s:.1f} samples/s "
                 f"({twin.samples_per_s / rate - 1:+.1%}); a change is kept only beyond {MARGIN:.0%}"
                 if twin else "the other binding not measured")
        where = "launch.mpi_args" if s.bind == "core" else "binding"
        lines.append(f"{where} = --bind-to {s.bind}: {other}")
    return lines


def _closest(trials: List[Trial], s: Setting, pred: Any) -> Optional[Trial]:
    """The trial matching ``pred`` that differs from ``s`` in the fewest knobs (ties: the faster)."""
    found = [t for t in trials if pred(t.setting)]
    if not found:
        return None
    diff = lambda t: sum(a != b for a, b in zip(t.setting.cells(), s.cells()))  # noqa: E731
    return min(found, key=lambda t: (diff(t), -(t.samples_per_s or 0.0)))


def write_config(path_in: str, path_out: str, s: Setting, overrides: List[str]) -> None:
    """The config with the chosen launch.np / threads / interop_threads, train.batch_size (and the
    binding in launch.mpi_args); then loaded again to prove it is valid."""
    import yaml

    from lmsdp.launcher.config import Config, load_config
    from lmsdp.launcher.config.typed_yaml import apply_override, read_yaml

    raw = read_yaml(path_in)
    for item in overrides:
        apply_override(raw, item, Config)
    launch = raw.setdefault("launch", {}) or {}
    raw["launch"] = launch
    launch.update(np=s.np, threads=s.threads, interop_threads=s.interop)
    mpi_args = re.sub(r"--(map-by|bind-to)\s+\S+", "", str(launch.get("mpi_args", "") or "")).strip()
    if s.bind == "core":
        mpi_args = f"{mpi_args} {core_binding(s.threads)}".strip()
    launch["mpi_args"] = mpi_args
    train = raw.setdefault("train", {}) or {}
    raw["train"] = train
    train["batch_size"] = s.batch
    folder = os.path.dirname(os.path.abspath(path_out))
    if not os.path.isdir(folder):
        raise UserError(f"--write: folder not found: {folder}")
    try:
        with open(path_out, "w", encoding="utf-8") as handle:
            handle.write(f"# written by lmsrun tune from {path_in}\n")
            yaml.safe_dump(raw, handle, sort_keys=False)
    except OSError as exc:
        raise UserError(f"--write: cannot write {path_out}: {exc.strerror}") from None
    load_config(path_out)


def parse_duration(text: str) -> float:
    """'120', '120s', '2m', '1.5min', '1h' -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", text or "")
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 120s, 2m or 90, got {text!r}")
    value = float(match.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmsrun tune", allow_abbrev=False,
                     description="Choose ranks, threads, inter-op threads, batch and binding by short "
                                 "measured trials (real launches) inside a time budget.")
    parser.add_argument("config", help="YAML config to tune")
    parser.add_argument("--time-budget", type=parse_duration, default=120.0, metavar="DURATION",
                        help="wall time for all trials, e.g. 120s, 5m (default 120s)")
    parser.add_argument("--write", metavar="FILE", help="write the config with the chosen values to FILE")
    parser.add_argument("--trial-steps", type=positive_int, default=6, metavar="N",
                        help="steps per trial, the first --warmup not counted (default 6)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="warm-up steps per trial (default 2)")
    parser.add_argument("--max-batch", type=positive_int, metavar="N", help="largest batch per rank to try")
    parser.add_argument("--ranks", type=rank_list, metavar="LIST",
                        help="ranks per node to try on CPU, e.g. 1,2,4,8 (default: every count from 1 to the cores)")
    parser.add_argument("--exhaustive", action="store_true", help="measure the whole space (reference sweep)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write every trial and the pick as JSON")
    return parser


def main(argv: List[str]) -> int:
    return run(argv)


def run(argv: List[str]) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    if args.warmup < 0 or args.warmup >= args.trial_steps:
        raise UserError(f"--warmup: expected 0 to {args.trial_steps - 1} (fewer than --trial-steps), got {args.warmup}")
    if args.write and os.path.isdir(args.write):
        raise UserError(f"--write: {args.write} is a directory; give a file name, e.g. tuned.yaml")
    from lmsdp.runtime.topology import detect_launched

    launched = detect_launched()
    if launched is not None:  # every rank would tune, and each trial's mpirun would nest in the job's
        raise UserError(f"tune: this process is rank {launched.rank} of {launched.size} started by {launched.source}; "
                        "tune launches its own trials: run 'lmsrun tune CONFIG' once, not under mpirun/srun/torchrun")
    from lmsdp.launcher.config import load_config

    config = load_config(args.config, args.overrides)
    space, batch_source = make_space(config, args.max_batch, args.ranks)
    np0 = space.ranks[0] if space.gpu else min(config.launch.np, space.most_ranks)
    threads0 = config.launch.threads if isinstance(config.launch.threads, int) and config.launch.threads else \
        max(1, space.cores // np0)
    base = Setting(np0, threads0, config.launch.interop_threads, config.train.batch_size, "none")
    kind = "GPU: one rank per GPU" if space.gpu else "CPU"
    limits = local_limits()[2]
    kind += f"; {limits}, at most {space.ranks[-1]} rank(s)" if limits else ""
    print(f"lmsrun tune: {args.config} on {space.cores} core(s) ({kind}); budget {args.time_budget:.0f} s, "
          f"{args.trial_steps} steps per trial ({args.warmup} warm-up)", flush=True)
    header = f"{'#':>3} {'ranks':>5} {'thr':>4} {'interop':>7} {'batch':>5} {'bind':>4} " \
             f"{'samples/s':>10} {'predicted':>10} {'wall':>6}  note"
    print(header, flush=True)

    def show(index: int, trial: Trial) -> None:
        rate = f"{trial.samples_per_s:.1f}" if trial.ok else "stopped" if trial.error == "interrupted" else "failed"
        pred = f"{trial.predicted:.1f}" if trial.predicted is not None else "-"
        note = trial.error if trial.error else trial.note
        n, t, i, b, bind = trial.setting.cells()
        print(f"{index:>3} {n:>5} {t:>4} {i:>7} {b:>5} {bind:>4} {rate:>10} {pred:>10} {trial.wall_s:>5.1f}s  {note}",
              flush=True)

    workdir = tempfile.mkdtemp(prefix="lmsrun-tune-")
    runner = TrialRunner(os.path.abspath(args.config), args.overrides, args.trial_steps, args.warmup, workdir,
                         deadline=started + args.time_budget - SLACK_S)
    tuner = Tuner(space, base, runner, args.time_budget, started, show)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late budget timer must not kill tune itself
    try:
        tuner.sweep() if args.exhaustive else tuner.search()
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    pick = choose(tuner)
    if pick is None:
        reason = tuner.trials[0].error if tuner.trials else tuner.stopped or "no trial ran"
        raise UserError(f"tune: no trial finished ({reason})",
                        hint="does 'lmsrun CONFIG' run? raise --time-budget if the first trial was cut")
    for note in tuner.notes.values():
        print(f"    {note}")
    if tuner.stopped:
        print(f"stopped: {tuner.stopped}")
    grid_size = space.size()
    print(f"best: #{pick.number}  {pick.setting.np} rank(s) x {pick.setting.threads} thread(s), "
          f"inter-op {pick.setting.interop or 'default'}, batch {pick.setting.batch}, --bind-to {pick.setting.bind}: "
          f"{pick.samples_per_s:.1f} samples/s  ({tuner.runs} trials of a {grid_size}-setting space, "
          f"{time.monotonic() - started:.0f} s)")
    print("why:")
    for line in explain(tuner, pick, base, space, batch_source):
        print(f"  {line}")
    if args.json:
        _write_json(args.json, tuner, pick, grid_size)
    if args.write:
        write_config(args.config, args.write, pick.setting, args.overrides)
        print(f"wrote {args.write} (launch.np, launch.threads, launch.interop_threads, train.batch_size, "
              f"launch.mpi_args)")
    return 130 if tuner.stopped == "interrupted" else 0


def _write_json(path: str, tuner: Tuner, pick: Trial, grid_size: int) -> None:
    def row(t: Trial) -> Dict[str, Any]:
        return {**t.setting.__dict__, "samples_per_s": t.samples_per_s, "rates": t.rates,
                "predicted": t.predicted, "wall_s": t.wall_s, "error": t.error, "note": t.note,
                "backend": t.backend}

    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"trials": [row(t) for t in tuner.trials], "pick": row(pick), "space_size": grid_size,
                   "runs": tuner.runs, "stopped": tuner.stopped}, handle, indent=1)
