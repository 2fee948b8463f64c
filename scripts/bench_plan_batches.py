#!/usr/bin/env python3
"""Predicted largest batch and step time per strategy (no swap, recompute only, swap only, planned) for
GPT-2 small and ResNet-50 on a GPU of each memory size, planned from this machine (fake tensors, times
from FLOPs at ``--tflops``, the link at ``--link-gbps``). Predictions only: nothing runs on a GPU.

    python scripts/bench_plan_batches.py [--tflops 400] [--link-gbps 50] [--memory 16 80] [--models NAME ..]
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Dict, List, Optional

import torch

from lmsdp.launcher.config import load_config
from lmsdp.launcher.train.job_plan import batch_planner, workload_from_config
from lmsdp.swapping.batch_search import APPROACHES
from lmsdp.swapping.profile import optimizer_state_bytes

MODELS: Dict[str, List[str]] = {
    "GPT-2 small": ["model.name=gpt", "model.kwargs={vocab: 50257, seq_len: 1024, layers: 12, width: 768, heads: 12}",
                    "train.amp=true", "train.amp_dtype=bfloat16", "swap.threshold=4MiB"],
    "ResNet-50": ["model.name=resnet50", "model.kwargs={num_classes: 1000, stem: imagenet}", "data.shape=[3, 224, 224]",
                  "train.amp=true", "train.amp_dtype=bfloat16", "swap.threshold=1MiB"],
}
STRATEGIES = [*APPROACHES, "planned"]


def step_at(planner: Any, batch: int, strategy: str) -> Optional[float]:
    """Predicted step (s) of ``strategy`` at ``batch``: the plan's choice, or that approach's fastest row."""
    if batch == 0:
        return None
    if strategy == "planned":
        return planner.plan(batch).chosen.prediction.step_s
    rows = [r for r in planner.plan(batch, per_module=False).strategies if APPROACHES[strategy](r.name) and r.fits]
    return min(r.prediction.step_s for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=400.0)
    parser.add_argument("--link-gbps", type=float, default=50.0)
    parser.add_argument("--memory", type=int, nargs="+", default=[16, 80], metavar="GIB")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# predictions: {args.tflops:g} TFLOP/s, link {args.link_gbps:g} GB/s, bf16 autocast, AdamW")
    print(f"{'model':<12} {'memory':>7} {'strategy':<15} {'largest batch':>13} {'step':>10} {'samples/s':>10}")
    for name in args.models:
        config = load_config(None, [*MODELS[name], "train.batch_size=8", "swap.enabled=false"])
        workload = workload_from_config(config)
        first = batch_planner(config, 1 << 30, args.link_gbps * 1e9, args.tflops * 1e12, workload,
                              optimizer_state_bytes(workload))
        for gib in args.memory:
            planner = dataclasses.replace(first, target=gib << 30, _plans={})  # the same profiles, another target
            t0 = time.perf_counter()
            for strategy in STRATEGIES:
                batch = planner.largest(8, strategy)
                step = step_at(planner, batch, strategy)
                text = f"{step * 1e3:>8.1f}ms {batch / step:>10.0f}" if step else f"{'-':>10} {'-':>10}"
                print(f"{name:<12} {gib:>4}GiB {strategy:<15} {batch:>13} {text}", flush=True)
            print(f"# {name} {gib} GiB searched in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
