"""Soak: a rank's resident memory (RSS) over a long run with tracing off, with the default trace
schedule, and with every step traced, side by side in one invocation (issue 29: the quickstart's
traces grew a rank by ~95 KB per step).

Each variant is one in-place rank (``lmsrun -np 1``) of the quickstart config (``--tiny``: a tiny GPT
for a quick look) with the same seed; RSS comes from the rank's own per-step ``rss_bytes``. Printed: a
table of RSS after warm-up and at the end, the least-squares slope from ``--warm-up`` on, and the
trace files' total size; ``--png`` draws RSS over the steps of every variant."""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
TINY = ["model.name=gpt", "model.kwargs={vocab: 64, seq_len: 16, layers: 2, width: 32, heads: 4}",
        "data.shape=null", "data.classes=null", "train.batch_size=4", "swap.threshold=0", "swap.keep_last=0"]
COMMON = ["train.checkpoint_every=0", "train.progress=false", "launch.threads=1", "swap.transport=loopback"]


def variants(steps: int) -> Dict[str, List[str]]:
    """Name -> config overrides: the three ways of running the same job."""
    return {
        "tracing off": ["swap.trace=null", "comm.timeline=null"],
        "traced, default schedule": [],  # the quickstart's traces, train.trace_steps [10, 14]
        "every step traced": [f"train.trace_steps=[1,{steps}]"],
    }


def run(out: str, steps: int, sets: List[str], timeout: float) -> Tuple[List[int], List[int], int]:
    """(steps, RSS bytes per step, trace files' bytes) of one in-place rank."""
    args = [LMSRUN, "configs/quickstart.yaml", "-np", "1", "--output-dir", out]
    for item in sets + [f"train.steps={steps}"]:
        args += ["--set", item]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"bench_soak: {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.rank0.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    traces = {p for pattern in ("*trace*.json", "*timeline*.json") for p in glob.glob(os.path.join(out, pattern))}
    trace_bytes = sum(os.path.getsize(p) for p in traces if os.path.basename(p) != "trace.json")
    return [r["step"] for r in records], [r["rss_bytes"] for r in records], trace_bytes


def slope(steps: List[int], rss: List[int], warm_up: int) -> float:
    """Bytes per step, least squares over the steps from ``warm_up`` on."""
    pairs = [(s, r) for s, r in zip(steps, rss) if s >= warm_up]
    return float(np.polyfit([s for s, _ in pairs], [r for _, r in pairs], 1)[0])


def draw(results: Dict[str, Tuple[List[int], List[int], int]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, (steps, rss, _) in results.items():
        ax.plot(steps, [r / 2 ** 20 for r in rss], lw=1.3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("RSS of the rank (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warm-up", type=int, default=200, help="first step of the slope fit")
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT instead of the quickstart's ResNet")
    parser.add_argument("--png", help="draw RSS over the steps here")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    model = TINY if args.tiny else []
    results: Dict[str, Tuple[List[int], List[int], int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_soak-") as root:
        for index, (name, sets) in enumerate(variants(args.steps).items()):
            results[name] = run(os.path.join(root, str(index)), args.steps, model + COMMON + sets, args.timeout)
    base = slope(*results["tracing off"][:2], args.warm_up)
    print(f"{'variant':<26} {'RSS @' + str(args.warm_up):>10} {'RSS end':>10} {'slope KB/step':>14} "
          f"{'vs off':>8} {'trace files':>12}")
    for name, (steps, rss, trace_bytes) in results.items():
        at_warm = next(r for s, r in zip(steps, rss) if s >= args.warm_up)
        grow = slope(steps, rss, args.warm_up)
        print(f"{name:<26} {at_warm / 2 ** 20:>8.1f}Mi {rss[-1] / 2 ** 20:>8.1f}Mi {grow / 1024:>14.2f} "
              f"{grow - base:>+7.0f}B {trace_bytes / 2 ** 20:>10.2f}Mi")
    if args.png:
        what = "tiny GPT" if args.tiny else "quickstart ResNet-18 (width 16)"
        draw(results, args.png, f"RSS over {args.steps} steps, 1 rank in place, {what}: tracing off vs on")
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
