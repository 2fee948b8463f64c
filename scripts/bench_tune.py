#!/usr/bin/env python3
"""Uniform thread rule vs ``lmsrun tune``'s pick vs ``launch.threads: auto``, and tune vs an
exhaustive sweep of the same space, on the zoo's ResNet and GPT (small CPU sizes). Every figure is a
real ``lmsrun`` run; variants are interleaved, ``--repeats`` times, and the median is reported.

    python scripts/bench_tune.py [--budget 60] [--repeats 3] [--steps 20] [--no-sweep] [--out FILE]
                                 [--workloads resnet18,gpt] [--ranks 1,2,4,8,16] [--max-batch N]

samples/s is the median of rank 0's per-step figures after step ``--steps // 2`` (so that auto's
measuring steps and every warm-up are left out)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

from lmsdp.launcher.tools.tune_search import core_binding

LMSRUN = [sys.executable, "-m", "lmsdp.launcher.cli"]  # this interpreter's lmsrun, wherever pip put the script
WORKLOADS: Dict[str, str] = {
    "resnet18 (w16, 32x32, b16)": """name: bench_resnet
model: {name: resnet18, kwargs: {width: 16, num_classes: 10, stem: cifar}}
data: {shape: [3, 32, 32], classes: 10}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
train: {batch_size: 16, progress: false}
comm: {backend: torch}
launch: {np: 2}
""",
    "gpt (4x128, seq 128, b8)": """name: bench_gpt
model: {name: gpt, kwargs: {vocab: 1024, seq_len: 128, layers: 4, width: 128, heads: 4}}
optimizer: {name: adamw, lr: 0.0003}
train: {batch_size: 8, progress: false}
comm: {backend: torch}
launch: {np: 2}
""",
}


def run(config: str, out: str, steps: int, extra: List[str]) -> float:
    argv = [*LMSRUN, config, "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=0",
            "--set", "train.resume=false", "--output-dir", out] + extra
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.rank0.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return statistics.median(r["samples_per_s"] for r in records if r["step"] > steps // 2)


def tune(config: str, workdir: str, budget: int, exhaustive: bool, tag: str, space: List[str]) -> dict:
    written, report = os.path.join(workdir, f"{tag}.yaml"), os.path.join(workdir, f"{tag}.json")
    argv = [*LMSRUN, "tune", config, "--time-budget", f"{budget}s", "--trial-steps", "4", "--warmup", "1",
            "--write", written, "--json", report] + space + (["--exhaustive"] if exhaustive else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    print(proc.stdout, file=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    with open(report) as handle:
        data = json.load(handle)
    data["config"] = written
    return data


def setting_args(row: dict) -> List[str]:
    """lmsrun flags that run one trial row of tune's JSON (the way tune's own trials ran it)."""
    argv = ["-np", str(row["np"]), "--threads", str(row["threads"]), "--set", f"train.batch_size={row['batch']}",
            "--set", f"launch.interop_threads={row['interop']}"]
    if row["bind"] == "core":
        argv += ["--mpi-args", core_binding(row["threads"])]
    return argv


def top_settings(report: dict, count: int) -> List[dict]:
    """The ``count`` best measured settings of a tune/sweep report, best first."""
    ok = [t for t in report["trials"] if t["samples_per_s"] is not None]
    return sorted(ok, key=lambda t: -t["samples_per_s"])[:count]


def label(pick: dict) -> str:
    return f"{pick['np']}x{pick['threads']} interop {pick['interop'] or 'dflt'} b{pick['batch']} {pick['bind']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60, help="tune's --time-budget in seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-sweep", action="store_true", help="skip the exhaustive sweep")
    parser.add_argument("--sweep-top", type=int, default=3, help="the sweep's best settings re-measured")
    parser.add_argument("--ranks", help="tune's --ranks for both searches, e.g. 1,2,4,8,16 (bounds the sweep)")
    parser.add_argument("--max-batch", type=int, help="tune's --max-batch for both searches")
    parser.add_argument("--workloads", default=",".join(w.split()[0] for w in WORKLOADS),
                        help="comma list of workloads to run (default: all)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-tune-")
    rows, results = [], {}
    space = (["--ranks", args.ranks] if args.ranks else []) + (["--max-batch", str(args.max_batch)] if args.max_batch else [])
    chosen = args.workloads.split(",")
    for name, text in WORKLOADS.items():
        if name.split()[0] not in chosen:
            continue
        config = os.path.join(work, f"{name.split()[0]}.yaml")
        with open(config, "w") as handle:
            handle.write(text)
        picked = tune(config, work, args.budget, False, f"{name.split()[0]}-tune", space)
        variants = {"uniform rule": (config, []), "tune's pick": (picked["config"], []),
                    "threads: auto": (config, ["--set", "launch.threads=auto"])}
        sweep_top: List[str] = []
        if not args.no_sweep and name.startswith("resnet"):
            swept = tune(config, work, 1800, True, f"{name.split()[0]}-sweep", space)
            # the sweep's best is decided by re-measuring its top 3 beside tune's pick: one short trial
            # per setting can read lucky, and the reference must not be a lucky reading
            for i, row in enumerate(top_settings(swept, args.sweep_top)):
                sweep_top.append(f"sweep #{i + 1} {label(row)}")
                variants[sweep_top[-1]] = (config, setting_args(row))
        rates: Dict[str, List[float]] = {v: [] for v in variants}
        for r in range(args.repeats):  # interleaved: every variant once per round
            for i, (v, (cfg, extra)) in enumerate(variants.items()):
                rates[v].append(run(cfg, os.path.join(work, f"{name.split()[0]}-{i}-{r}"), args.steps, extra))
        med = {v: statistics.median(x) for v, x in rates.items()}
        if sweep_top:
            best_top = max(sweep_top, key=lambda v: med[v])
            med["sweep's best"] = med[best_top]
            swept["best_remeasured"] = best_top
        results[name] = {"median": med, "all": rates, "tune": picked, "sweep": swept if sweep_top else None}
        rows.append((name, med, picked, results[name]["sweep"]))
    print("\n| workload | uniform rule | tune's pick (setting, trials) | threads: auto | tune / uniform | auto / uniform |")
    print("|---|---|---|---|---|---|")
    for name, med, picked, _ in rows:
        u, t, a = med["uniform rule"], med["tune's pick"], med["threads: auto"]
        print(f"| {name} | {u:.1f} | {t:.1f} ({label(picked['pick'])}, {picked['runs']} trials) | {a:.1f} | "
              f"{t / u:.2f} | {a / u:.2f} |")
    for name, med, picked, swept in rows:
        if swept:
            t, s = med["tune's pick"], med["sweep's best"]
            print(f"\n{name}, re-measured interleaved ({args.repeats} rounds, median samples/s):")
            print("| variant | samples/s | during its search |")
            print("|---|---|---|")
            print(f"| tune's pick ({label(picked['pick'])}) | {t:.1f} | {picked['pick']['samples_per_s']:.1f} |")
            for v in sorted((v for v in med if v.startswith("sweep #")), key=lambda v: v):
                row = top_settings(swept, args.sweep_top)[int(v.split()[1][1:]) - 1]
                print(f"| {v} | {med[v]:.1f} | {row['samples_per_s']:.1f} |")
            print(f"tune / sweep's best = {t / s:.3f} ({swept['best_remeasured']}); trials {picked['runs']} / "
                  f"{swept['runs']} = {picked['runs'] / swept['runs']:.2f}; goal: >= 0.95 with <= 0.33")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
