#!/usr/bin/env python3
"""Predicted vs measured, per zoo model and batch: the planner's saved-tensor peak against the engine's
accounting, and its step time against the measured median step, for the plan chosen at a memory target
halfway between "everything swapped" and "nothing swapped". CPU loopback unless a GPU is present (then
``max_memory_allocated`` is compared with the predicted device peak as well). Prints a table and writes
a PNG.

    python scripts/bench_plan.py [--steps 7] [--png bench_plan.png] [--threads 1]
    python scripts/bench_plan.py --recompute     # predicted step, per-kind vs per-module recompute
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Dict, List

import torch

from lmsdp.launcher.config import load_config
from lmsdp.launcher.tools.plan import workload_from_config
from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.plan_models import Settings, predict
from lmsdp.swapping.planner import plan_swaps, policy_for
from lmsdp.swapping.profile import link_bandwidth, profile_workload

ZOO = {  # small enough for 2 CPU cores, large enough that each step has hundreds of saved tensors
    "resnet18": ["model.kwargs={width: 16, num_classes: 10, stem: cifar}", "data.shape=[3, 32, 32]"],
    "resnet50": ["model.kwargs={width: 8, num_classes: 10, stem: cifar}", "data.shape=[3, 32, 32]"],
    "resnet152": ["model.kwargs={width: 4, num_classes: 10, stem: cifar}", "data.shape=[3, 32, 32]"],
    "gpt": ["model.kwargs={vocab: 512, seq_len: 64, layers: 4, width: 128, heads: 4}"],
    "unet3d": ["model.kwargs={width: 8, levels: 3, classes: 3}", "data.shape=[1, 24, 24, 24]"],
}
BATCHES = (2, 4, 8)


def measure(workload: Any, batch: int, settings: Settings, profile: Any, device: torch.device,
            steps: int) -> Dict[str, float]:
    torch.manual_seed(0)
    model = workload.build_model().to(device)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=settings.threshold), device,
                        policy=policy_for(settings, profile))
    inputs, targets = workload.make_batch(batch)
    inputs, targets = inputs.to(device), targets.to(device)
    times: List[float] = []
    stats: Dict[str, float] = {}
    try:
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with engine:
                loss = workload.loss(model(inputs), targets)
            loss.backward()
            stats = engine.step_end()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # step 0 warms up
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    finally:
        engine.close()
    stats["step_s"] = statistics.median(times)
    return stats


RECOMPUTE_ZOO = {"resnet18": ZOO["resnet18"], "gpt": ZOO["gpt"]}


def recompute_table(threshold: int = 1 << 20) -> None:
    """Predicted step time of the best per-kind plan (swap only, or swap + a recompute kind rule) against
    the per-module plan, at targets from loose to below what swapping alone reaches (a fraction of the
    way from swap-only's smallest peak to the no-swap peak; negative: below it). Predictions only."""
    from lmsdp.launcher.tools.plan import plan_config
    from lmsdp.swapping.planner import PER_MODULE

    device = torch.device("cpu")
    link = link_bandwidth(device)
    print(f"# predicted step (ms), CPU profile, link {link / 1e9:.1f} GB/s, threshold {threshold >> 10} KiB, batch 8")
    print(f"{'model':<9} {'target':>9} {'per-kind':>9} {'per-module':>10} {'ratio':>6}  modules")
    for name, extra in RECOMPUTE_ZOO.items():
        config = load_config(None, [f"model.name={name}", *extra, "train.steps=1", f"swap.threshold={threshold}"])
        loose = plan_config(config, 1 << 40, 8, link, device)
        base = loose.profiles["none"]
        low = predict(base, Settings(threshold, 1, swap=list(range(len(base.candidates(threshold))))), link)
        high = predict(base, Settings(threshold, 0, enabled=False), link).peak_device_bytes
        for frac in (0.5, 0.2, 0.0, -0.1, -0.2):
            target = int(low.peak_device_bytes + frac * (high - low.peak_device_bytes))
            result = plan_config(config, target, 8, link, device)
            rows = {s.name: s for s in result.strategies}
            kinds = [s for n, s in rows.items() if n not in (PER_MODULE, "planned", "configured") and s.fits]
            per_kind = [_planned_per_kind(result, target, link, threshold)] + [s.prediction.step_s for s in kinds]
            best_kind = min((x for x in per_kind if x is not None), default=None)
            mod = rows[PER_MODULE]
            text_kind = f"{best_kind * 1e3:>7.1f}ms" if best_kind is not None else f"{'no fit':>9}"
            text_mod = f"{mod.prediction.step_s * 1e3:>8.1f}ms" if mod.fits else f"{'no fit':>10}"
            ratio = f"{mod.prediction.step_s / best_kind:>6.2f}" if mod.fits and best_kind else f"{'-':>6}"
            names = ",".join(str(m) for m in (mod.recompute or [])) if mod.fits else ""
            print(f"{name:<9} {target / 2**20:>7.2f}Mi {text_kind} {text_mod} {ratio}  {names[:70]}", flush=True)


def _planned_per_kind(result: Any, target: int, link: float, threshold: int) -> Any:
    """The fastest fitting swap plan over the per-kind variants (none, auto, all cheap)."""
    best = None
    for key in ("none", "auto", "activation,norm,pool,dropout"):
        _s, pred = plan_swaps(result.profiles[key], target, link, threshold)
        if pred.peak_device_bytes <= target and (best is None or pred.step_s < best):
            best = pred.step_s
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recompute", action="store_true", help="per-kind vs per-module recompute table only")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", default="bench_plan.png")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="lmsdp swap")
    torch.set_num_threads(args.threads)
    if args.recompute:
        recompute_table()
        return
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    link = link_bandwidth(device)
    threshold = 4096
    print(f"# device {device} ({'CUDA' if device.type == 'cuda' else 'CPU, loopback transport'}), link "
          f"{link / 1e9:.1f} GB/s, {args.threads} thread(s), median of {args.steps} steps")
    head = (f"{'model':<10} {'batch':>5} {'swapped':>9} {'saved pred':>11} {'saved meas':>11} {'err':>6} "
            f"{'step pred':>10} {'step meas':>10} {'err':>7}")
    if device.type == "cuda":
        head += f" {'dev pred':>10} {'dev meas':>10} {'err':>6}"
    print(head)
    rows = []
    for name, extra in ZOO.items():
        config = load_config(None, [f"model.name={name}", *extra, "train.steps=1"])
        workload = workload_from_config(config)
        for batch in BATCHES:
            profile = profile_workload(workload, batch, device=device)
            everything = Settings(threshold, 1, swap=list(range(len(profile.candidates(threshold)))))
            low = predict(profile, everything, link).peak_device_bytes
            high = predict(profile, Settings(threshold, 0, enabled=False), link).peak_device_bytes
            settings, pred = plan_swaps(profile, (low + high) // 2, link, threshold)
            got = measure(workload, batch, settings, profile, device, args.steps)
            saved_err = (got["peak_saved_bytes"] - pred.peak_saved_bytes) / pred.peak_saved_bytes
            step_err = (got["step_s"] - pred.step_s) / pred.step_s
            line = (f"{name:<10} {batch:>5} {len(pred.swapped):>4}/{len(profile.candidates(threshold)):<4} "
                    f"{pred.peak_saved_bytes / 2**20:>9.2f}Mi {got['peak_saved_bytes'] / 2**20:>9.2f}Mi "
                    f"{saved_err:>+6.1%} {pred.step_s * 1e3:>8.1f}ms {got['step_s'] * 1e3:>8.1f}ms {step_err:>+7.1%}")
            row = {"name": name, "batch": batch, "saved_err": saved_err, "step_err": step_err,
                   "step_pred": pred.step_s, "step_meas": got["step_s"]}
            if device.type == "cuda" and got.get("max_memory_allocated"):
                dev_err = (got["max_memory_allocated"] - pred.peak_device_bytes) / pred.peak_device_bytes
                line += (f" {pred.peak_device_bytes / 2**20:>8.1f}Mi {got['max_memory_allocated'] / 2**20:>8.1f}Mi "
                         f"{dev_err:>+6.1%}")
                row["dev_err"] = dev_err
            print(line, flush=True)
            rows.append(row)
    errs = [abs(r["step_err"]) for r in rows]
    print(f"# saved-peak error: max {max(abs(r['saved_err']) for r in rows):.1%}; step-time error: median "
          f"{statistics.median(errs):.1%}, max {max(errs):.1%}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    for name in ZOO:
        pts = [r for r in rows if r["name"] == name]
        ax.scatter([r["step_pred"] * 1e3 for r in pts], [r["step_meas"] * 1e3 for r in pts], label=name)
    top = max(max(r["step_pred"], r["step_meas"]) for r in rows) * 1e3 * 1.1
    ax.plot([0, top], [0, top], "k--", linewidth=0.8)
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("measured median step time (ms)")
    ax.set_title(f"lmsrun plan: step time, {device.type} ({'loopback' if device.type == 'cpu' else 'CUDA'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"# wrote {args.png}")


if __name__ == "__main__":
    main()
