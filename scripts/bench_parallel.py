"""The layout planner against real jobs: for a small GPT on CPU with 4 ranks (real ``lmsrun -np 4``,
gloo), each layout ``{dp: 4, tp: 1}``, ``{dp: 2, tp: 2}``, ``{dp: 1, tp: 4}`` under replicate and
shard is run for real and predicted by the planner (``lmsdp.swapping.layout``, the same code
``lmsrun plan`` and ``comm.mesh: auto`` use), side by side: step time and per-rank memory, and
their ratios; then whether the planner's pick is the measured-fastest layout among those that fit
(samples per second), or within 10 % of it.

Memory per rank, measured: the tensors a rank holds after a step (``param_bytes``, ``grad_bytes``,
``optim_bytes``: a DTensor counts its local part) plus the swap engine's peak of saved activations
(``peak_saved_bytes``; the engine runs with an unbounded budget, so it only counts); predicted: the
same terms from the layout model. Step time: the median over steps after ``--warmup``, then the
median over ``--runs`` interleaved runs (so load drift on a shared machine hits every layout alike).
Writes a table (stdout) and ``--out``/bench_parallel.json."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Tuple

from bench_jobs import run_job

MODEL = "{vocab: 256, seq_len: 128, layers: 2, width: 256, heads: 4}"
MEASURE = ["swap.enabled=true", "swap.threshold=0", "swap.budget=1TiB", "swap.transport=loopback"]
LAYOUTS: List[Tuple[int, int, str]] = [(4, 1, "replicate"), (4, 1, "shard"), (2, 2, "replicate"), (2, 2, "shard"),
                                       (1, 4, "replicate")]  # {dp: 1, tp: 4} shard: FSDP over one rank
WITHIN = 0.10


def base_sets(batch: int, steps: int) -> List[str]:
    return ["model.name=gpt", f"model.kwargs={MODEL}", "optimizer.name=adam", "optimizer.lr=0.001",
            f"train.steps={steps}", f"train.batch_size={batch}", "train.progress=false", "comm.backend=torch",
            *MEASURE]


def layout_sets(dp: int, tp: int, strategy: str) -> List[str]:
    return [f"comm.mesh={{dp: {dp}, tp: {tp}}}", f"comm.strategy={strategy}"]


def one_run(layout: Tuple[int, int, str], np: int, steps: int, batch: int, work: str) -> List[dict]:
    dp, tp, strategy = layout
    return run_job("bench_parallel", str(layout), os.path.join(work, f"dp{dp}-tp{tp}-{strategy}"), np,
                   base_sets(batch, steps) + layout_sets(dp, tp, strategy))


def measured(records: List[List[dict]], warmup: int) -> Dict[str, float]:
    last = records[-1][-1]
    held = sum(float(last.get(k, 0)) for k in ("param_bytes", "grad_bytes", "optim_bytes"))
    step = statistics.median(statistics.median(r["step_time_s"] for r in run[warmup:]) for run in records)
    return {"step_s": step, "memory": held + float(last.get("peak_saved_bytes", 0))}


def predicted(np: int, batch: int, memory: str, net_gbps: float) -> Any:
    """The planner's table for the same job (threads as a rank of an ``np``-rank job computes with)."""
    import torch

    from lmsdp.comm.collective_rates import measure_local
    from lmsdp.launcher.config import load_config
    from lmsdp.launcher.train.job_layout import choose_layout
    from lmsdp.launcher.train.job_plan import plan_config
    from lmsdp.launcher.train.layout_facts import rank_threads
    from lmsdp.swapping.layout import CommRates
    from lmsdp.swapping.units import parse_size

    config = load_config(None, base_sets(batch, 1) + [f"launch.np={np}"])
    torch.set_num_threads(rank_threads(config, np))
    device = torch.device("cpu")
    target = parse_size(memory)
    link = 5e9  # the loopback transport's copies: nothing is swapped under an unbounded budget
    result = plan_config(config, target, batch, link, device)
    share = None
    if net_gbps:
        rates = CommRates(20e-6, net_gbps * 1e9, "--net-gbps")
    else:
        ops, share = measure_local(np, rank_threads(config, np))
        rates = CommRates.measured(ops, f"measured among {np} local processes, compute x{share:.2f} when all run")
    return choose_layout(config, result.profiles, target, link, np, rates, device, compute=share)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-np", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--memory", default="1GiB", help="memory target the pick must fit (default 1GiB)")
    parser.add_argument("--net-gbps", type=float, default=0.0, help="collective rate (default: measured)")
    parser.add_argument("--layouts", default="", help="a subset, e.g. 4x1:replicate,2x2:shard (default: all)")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    choice = predicted(args.np, args.batch, args.memory, args.net_gbps)
    estimates = {(e.layout.dp, e.layout.tp, e.layout.strategy): e for e in choice.estimates}
    wanted = {tuple(map(int, item.split(":")[0].split("x"))) + (item.split(":")[1],)
              for item in args.layouts.split(",") if item}
    layouts = [lay for lay in LAYOUTS if lay in estimates and (not wanted or lay in wanted)]
    results: Dict[Tuple[int, int, str], List[List[dict]]] = {lay: [] for lay in layouts}
    with tempfile.TemporaryDirectory() as work:
        for run in range(args.runs):
            for lay in layouts:
                results[lay].append(one_run(lay, args.np, args.steps, args.batch, work))
                print(f"  run {run + 1}/{args.runs} {lay}: done", file=sys.stderr, flush=True)
    rows = {}
    for lay in layouts:
        e, m = estimates[lay], measured(results[lay], args.warmup)
        rows[lay] = {"pred_step_s": e.step_s, "step_s": m["step_s"], "pred_memory": e.held_bytes + e.saved_bytes,
                     "memory": m["memory"], "fits": e.fits, "pred_samples_s": e.samples_per_s,
                     "samples_s": lay[0] * args.batch / m["step_s"]}
    print(f"GPT {MODEL}, Adam fp32, batch {args.batch} per dp replica, {args.np} ranks on CPU (gloo), "
          f"median of {args.runs} runs; memory target {args.memory}; collectives at "
          f"{choice.rates.bandwidth_bps / 1e9:.2f} GB/s, {choice.rates.latency_s * 1e6:.0f} us/hop ({choice.rates.how})\n")
    print("| layout | predicted step ms | measured step ms | ratio | predicted MiB/rank | measured MiB/rank | ratio "
          "| measured samples/s | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (dp, tp, strategy), r in rows.items():
        print(f"| dp {dp} x tp {tp} {strategy} | {r['pred_step_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.1f} | "
              f"{r['pred_step_s'] / r['step_s']:.2f} | {r['pred_memory'] / 2**20:.2f} | {r['memory'] / 2**20:.2f} | "
              f"{r['pred_memory'] / max(1.0, r['memory']):.2f} | {r['samples_s']:.1f} | {'yes' if r['fits'] else 'no'} |")
    fitting = {lay: r for lay, r in rows.items() if r["fits"]}
    verdict = "no layout fits"
    if choice.chosen is not None and fitting:
        pick = (choice.chosen.layout.dp, choice.chosen.layout.tp, choice.chosen.layout.strategy)
        best = max(fitting, key=lambda lay: fitting[lay]["samples_s"])
        gap = 1 - rows[pick]["samples_s"] / rows[best]["samples_s"] if pick in rows else float("nan")
        ok = pick == best or gap <= WITHIN
        verdict = (f"pick: dp {pick[0]} x tp {pick[1]} {pick[2]}; measured fastest that fits: dp {best[0]} x tp "
                   f"{best[1]} {best[2]}; the pick is {gap:.1%} slower -> {'OK' if ok else 'NOT'} within "
                   f"{WITHIN:.0%}" if pick != best else f"pick: dp {pick[0]} x tp {pick[1]} {pick[2]} = the "
                   "measured-fastest layout that fits -> OK")
    print("\n" + verdict)
    with open(os.path.join(args.out, "bench_parallel.json"), "w", encoding="utf-8") as handle:
        json.dump({"model": MODEL, "np": args.np, "batch": args.batch, "runs": args.runs, "verdict": verdict,
                   "rows": {f"dp{k[0]}-tp{k[1]}-{k[2]}": v for k, v in rows.items()}}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
