"""Per-rank memory and step time of ``comm.strategy`` replicate, shard and shard + swap, each a real
``lmsrun -np N`` job of the zoo GPT (CPU/gloo here; NCCL on GPUs).

Memory per rank is measured from the tensors each rank holds after a step (``param_bytes``,
``grad_bytes``, ``optim_bytes``: a DTensor counts its local shard) and the swap engine's peak of
saved activations resident on the device (``peak_saved_bytes``; the engine runs in every variant,
with an unbounded budget where nothing is to be swapped, so it only counts). Step time is the
median over steps after the first ``--warmup``, then the median over ``--runs`` interleaved runs
(replicate, shard, shard+swap, replicate, ...) so load drift on a shared machine hits all alike.

``--offload`` (needs CUDA) adds one-rank runs with and without ``comm.offload: optimizer_and_params``
and reports the device's peak allocated bytes: sharding across a world of one is meaningless,
offloading is not. Writes a table (stdout and ``--out``/bench_shard.json) and a PNG."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Dict, List

from bench_jobs import run_job

MODEL = "{vocab: 1024, seq_len: 128, layers: 4, width: 256, heads: 4}"
MEASURE = ["swap.enabled=true", "swap.threshold=0", "swap.budget=1TiB", "swap.transport=loopback"]
SWAP = ["swap.enabled=true", "swap.threshold=64KiB", "swap.budget=0", "swap.keep_last=1", "swap.prefetch=2"]
VARIANTS: Dict[str, List[str]] = {
    "replicate": ["comm.strategy=replicate"] + MEASURE,
    "shard": ["comm.strategy=shard"] + MEASURE,
    "shard + swap": ["comm.strategy=shard"] + SWAP,
}
OFFLOAD: Dict[str, List[str]] = {  # one GPU: what offload saves on the device
    "replicate (1 GPU)": ["comm.strategy=replicate"] + MEASURE,
    "shard + offload (1 GPU)": ["comm.strategy=shard", "comm.offload=optimizer_and_params"] + MEASURE,
}
KEYS = ("param_bytes", "grad_bytes", "optim_bytes", "peak_saved_bytes")


def one_run(name: str, overrides: List[str], np: int, steps: int, batch: int, work: str) -> List[dict]:
    sets = ["model.name=gpt", f"model.kwargs={MODEL}", "optimizer.name=adam", "optimizer.lr=0.001",
            f"train.steps={steps}", f"train.batch_size={batch}", "train.progress=false", "comm.backend=torch",
            *overrides]
    return run_job("bench_shard", name, os.path.join(work, name.replace(" + ", "-")), np, sets)


def summarize(records: List[List[dict]], warmup: int) -> Dict[str, float]:
    last = records[-1][-1]
    row: Dict[str, float] = {key: float(last.get(key, 0)) for key in KEYS}
    row["step_time_s"] = statistics.median(statistics.median(r["step_time_s"] for r in run[warmup:])
                                           for run in records)
    for key in ("allgather_ms", "reduce_scatter_ms", "allreduce_ms", "swap_out_bytes", "max_memory_allocated"):
        row[key] = statistics.median(statistics.median(r.get(key, 0) for r in run[warmup:]) for run in records)
    return row


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: Dict[str, Dict[str, float]]) -> str:
    base = rows.get("replicate") or next(iter(rows.values()))  # --offload-only: its replicate row
    state = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]  # noqa: E731
    lines = ["| variant | params MiB | grads MiB | optimizer MiB | p+g+o vs replicate | peak saved activations MiB "
             "(on device) | step s (median) | vs replicate | all-gather ms | reduce-scatter ms | allreduce ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {mib(r['param_bytes'])} | {mib(r['grad_bytes'])} | {mib(r['optim_bytes'])} | "
                     f"{state(r) / state(base):.3f} | {mib(r['peak_saved_bytes'])} | {r['step_time_s']:.4f} | "
                     f"{r['step_time_s'] / base['step_time_s']:.2f} | {r['allgather_ms']:.1f} | "
                     f"{r['reduce_scatter_ms']:.1f} | {r['allreduce_ms']:.1f} |")
    return "\n".join(lines)


def plot(rows: Dict[str, Dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(rows)
    bottom = [0.0] * len(names)
    for key, label in zip(KEYS, ("parameters", "gradients", "optimizer state", "saved activations")):
        values = [rows[n][key] / 2**20 for n in names]
        left.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("MiB per rank (device)")
    left.set_title("memory per rank")
    left.legend(fontsize=8)
    right.bar(names, [rows[n]["step_time_s"] for n in names], color="gray")
    right.set_ylabel("s per step (median)")
    right.set_title("step time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-np", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--offload", action="store_true", help="add the one-GPU offload runs (needs CUDA)")
    parser.add_argument("--offload-only", action="store_true",
                        help="only the one-GPU offload runs (a one-GPU machine cannot run the 2-rank variants)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    plans = [] if args.offload_only else [(name, overrides, args.np) for name, overrides in VARIANTS.items()]
    if args.offload or args.offload_only:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_shard: --offload needs CUDA (offload is a no-op on CPU)")
        plans += [(name, overrides, 1) for name, overrides in OFFLOAD.items()]
    results: Dict[str, List[List[dict]]] = {name: [] for name, _, _ in plans}
    with tempfile.TemporaryDirectory() as work:
        for run in range(args.runs):
            for name, overrides, np in plans:
                results[name].append(one_run(name, overrides, np, args.steps, args.batch, work))
                print(f"  run {run + 1}/{args.runs} {name}: done", file=sys.stderr, flush=True)
    rows = {name: summarize(records, args.warmup) for name, records in results.items()}
    text = table(rows)
    if args.offload or args.offload_only:
        text += "\n\n| one GPU | device peak allocated MiB |\n|---|---|\n" + "\n".join(
            f"| {name} | {mib(rows[name]['max_memory_allocated'])} |" for name in OFFLOAD)
    print(f"GPT {MODEL}, Adam fp32, batch {args.batch}/rank, {args.np} ranks, median of {args.runs} runs\n")
    print(text)
    with open(os.path.join(args.out, "bench_shard.json"), "w", encoding="utf-8") as handle:
        json.dump({"model": MODEL, "np": args.np, "batch": args.batch, "runs": args.runs, "rows": rows}, handle, indent=2)
    plot(rows, os.path.join(args.out, "bench_shard.png"))
    print(f"\nwrote {args.out}/bench_shard.json and {args.out}/bench_shard.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
