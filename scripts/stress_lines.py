"""Whole lines through lmsrun, measured: garbled lines per run, as a table.

``lines`` runs: ``lmsrun -np 4 --output-dir D -- python tests/scripts/fragment_writer.py`` (each rank writes
2,000 lines in random 1-50 byte fragments with short sleeps, some with ``\\r`` redraws, some 100 kB long,
some not UTF-8, the last without a newline); every line must arrive whole and in per-rank order on
lmsrun's stdout/stderr and in ``rank<R>.log``.
``done`` runs (issue 25's experiment): ``lmsrun -np 2 --swap-threshold 0 -- python
tests/scripts/hvd_train.py --done-words`` (Horovod; each rank ends with ``print("DONE", rank, flush=True)``);
rank 0's ``DONE 0`` and rank 1's ``[1] DONE 1`` must each be a line of their own.

    python scripts/stress_lines.py --lines-runs 20 --done-runs 25
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")
sys.path.insert(0, SCRIPTS)

import fragment_writer  # noqa: E402

LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")


def lmsrun(args: List[str], timeout: float) -> Tuple[int, bytes, bytes]:
    env = {**os.environ, "PYTHONPATH": SCRIPTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([LMSRUN, *args], cwd=REPO, env=env, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def lines_run(seed: int, ranks: int = 4, count: int = 2000, timeout: float = 600) -> fragment_writer.Verdict:
    """One stress run; the verdict counts the lines that did not arrive whole and in order."""
    with tempfile.TemporaryDirectory(prefix="lmsdp-lines-") as logs:
        code, out, err = lmsrun(["-np", str(ranks), "--output-dir", logs, "--", sys.executable,
                                 os.path.join(SCRIPTS, "fragment_writer.py"), "--seed", str(seed),
                                 "--lines", str(count)], timeout)
        if code != 0:
            raise RuntimeError(f"lmsrun exited with {code}: {err[-2000:].decode(errors='replace')}")
        return fragment_writer.check(out, err, logs, ranks, seed, count)


def done_run(timeout: float = 600) -> Tuple[bool, str]:
    """One run of issue 25's experiment: (both DONE lines whole, what came instead)."""
    code, out, err = lmsrun(["-np", "2", "--swap-threshold", "0", "--", sys.executable,
                             os.path.join(SCRIPTS, "hvd_train.py"), "--steps", "1", "--done-words"], timeout)
    lines = out.decode(errors="replace").splitlines()
    whole = code == 0 and "DONE 0" in lines and "[1] DONE 1" in lines
    return whole, "" if whole else f"exit {code}: " + repr([line for line in lines if "DONE" in line or not line])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines-runs", type=int, default=20)
    parser.add_argument("--done-runs", type=int, default=25)
    args = parser.parse_args()
    total_garbled = 0
    if args.lines_runs:
        print("| run | seconds | lines | garbled: stdout | stderr | rank logs |")
        print("|---:|---:|---:|---:|---:|---:|")
    for run in range(args.lines_runs):
        start = time.monotonic()
        verdict = lines_run(seed=run)
        logs = sum(n for place, n in verdict.garbled.items() if place.endswith(".log"))
        print(f"| {run} | {time.monotonic() - start:.1f} | {verdict.expected} | {verdict.garbled['stdout']} | "
              f"{verdict.garbled['stderr']} | {logs} |", flush=True)
        for example in verdict.examples:
            print(f"    {example}")
        total_garbled += verdict.total
    if args.lines_runs:
        print(f"\nstress: {total_garbled} garbled lines in {args.lines_runs} runs")
    split = 0
    for run in range(args.done_runs):
        whole, instead = done_run()
        if not whole:
            split += 1
            print(f"done run {run}: {instead}")
    if args.done_runs:
        print(f"DONE experiment: {split} of {args.done_runs} runs with a DONE line not whole")
    return 1 if total_garbled or split else 0


if __name__ == "__main__":
    sys.exit(main())
