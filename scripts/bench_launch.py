"""Launch overhead: seconds from starting ``lmsrun -np 2 -- python hvd_train.py`` to its first
training step, against ``horovodrun -np 2 python hvd_train.py`` on the same script.

Runs are interleaved (lmsrun, horovodrun, lmsrun, ...) so load drift on a shared machine hits both
alike; the median of N runs each is printed as a table with the ratio lmsrun / horovodrun.
The script prints ``FIRST_STEP <unix time>`` after its first optimizer step on each rank; the later
of the two ranks counts (a step is collective, so they are close)."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "scripts", "hvd_train.py")
BIN = os.path.dirname(sys.executable)
FIRST = re.compile(r"FIRST_STEP (\d+\.\d+)")


def commands(np: int, steps: int) -> Dict[str, List[str]]:
    script = [sys.executable, SCRIPT, "--steps", str(steps)]
    return {
        "lmsrun": [os.path.join(BIN, "lmsrun"), "-np", str(np), "--"] + script,
        "horovodrun": [os.path.join(BIN, "horovodrun"), "-np", str(np)] + script,
    }


def one_run(cmd: List[str], np: int, timeout: float) -> Tuple[Optional[float], float]:
    """(seconds to first step, seconds to exit) for one launch."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - start
    stamps = [float(m) for m in FIRST.findall(proc.stdout + proc.stderr)]
    if proc.returncode != 0 or len(stamps) < np:
        print(f"  {cmd[0]} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None, wall
    return max(stamps) - start, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-np", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        print(f"bench_launch: skipped: horovod.torch is not importable ({exc}); run make setup", file=sys.stderr)
        return 0
    if shutil.which("mpirun") is None:
        print("bench_launch: skipped: mpirun not found", file=sys.stderr)
        return 0
    cmds = commands(args.np, args.steps)
    first: Dict[str, List[float]] = {name: [] for name in cmds}
    walls: Dict[str, List[float]] = {name: [] for name in cmds}
    for i in range(args.runs):
        for name, cmd in cmds.items():
            to_first, wall = one_run(cmd, args.np, args.timeout)
            walls[name].append(wall)
            if to_first is not None:
                first[name].append(to_first)
            print(f"  run {i + 1}/{args.runs} {name:<10} first step {to_first if to_first is None else round(to_first, 2)} s"
                  f"  exit {wall:.2f} s", file=sys.stderr, flush=True)
    if not first["lmsrun"] or not first["horovodrun"]:
        print("bench_launch: a launcher never reached its first step", file=sys.stderr)
        return 1
    med = {name: statistics.median(values) for name, values in first.items()}
    print(f"\nLaunch to first step, -np {args.np}, median of {args.runs} interleaved runs "
          f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(f"| launcher   | to first step (s) | min..max (s)  | to exit (s) |")
    print(f"|------------|-------------------|---------------|-------------|")
    for name in cmds:
        vals = first[name]
        print(f"| {name:<10} | {med[name]:17.2f} | {min(vals):5.2f}..{max(vals):<6.2f} | "
              f"{statistics.median(walls[name]):11.2f} |")
    print(f"\nratio lmsrun / horovodrun (to first step): {med['lmsrun'] / med['horovodrun']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
