#!/usr/bin/env python
"""Swap engine benchmarks: a table on stdout, swap_bench.json and swap_bench.png under --out-dir.

CPU (always): step-time overhead of the engine switched on with nothing above threshold vs off (goal
<= 3 %), and step time with everything swapped on the loopback transport vs
torch.autograd.graph.save_on_cpu, each the median of N interleaved repetitions measured side by side.

GPU (when CUDA is available; one command: ``python scripts/bench_swap.py --gpu-only``): pinned H2D/D2H
bandwidth; the largest batch that trains under a memory cap (set_per_process_memory_fraction) with and
without the engine (goal >= 4x); throughput at 2x and 4x oversubscription relative to in-memory (goal
>= 85 % at 2x) for a ResNet-50-like and a GPT-like model; engine vs save_on_cpu(pin_memory=True) and vs
full checkpointing at the same batch and cap (goal >= 1.5x save_on_cpu); achieved swap GB/s.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmsdp.swapping import SwapConfig, SwapEngine

warnings.filterwarnings("ignore", message="lmsdp swap")


@dataclass
class Row:
    section: str
    metric: str
    value: str
    goal: str = ""


# ------------------------------------------------------------------------------------------- models
def build(name: str, **kw: object) -> nn.Module:
    """Zoo model if lmsdp.launcher.models is there, else a local stand-in of the same shape family."""
    try:
        from lmsdp.launcher.models import build_model
        return build_model(name, **kw)
    except Exception:
        return _fallback(name, **kw)


def _fallback(name: str, **kw: object) -> nn.Module:
    if name.startswith("resnet"):
        width = int(kw.get("width", 64))  # type: ignore[arg-type]
        layers: List[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for stage in range(4):
            out = width * 2 ** stage
            for i in range(2):
                layers += [nn.Conv2d(c, out, 3, 2 if (i == 0 and stage) else 1, 1, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, int(kw.get("num_classes", 10)))]  # type: ignore[arg-type]
        return nn.Sequential(*layers)
    vocab, width, n_layers = int(kw.get("vocab", 1024)), int(kw.get("width", 256)), int(kw.get("layers", 4))  # type: ignore[arg-type]
    heads = int(kw.get("heads", 4))  # type: ignore[arg-type]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    return nn.Sequential(nn.Embedding(vocab, width), *[Block() for _ in range(n_layers)], nn.LayerNorm(width),
                         nn.Linear(width, vocab))


@dataclass
class Workload:
    """A model, a batch maker and a loss."""

    name: str
    model: nn.Module
    make_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resnet_workload(device: torch.device, image: int, **kw: object) -> Workload:
    model = build("resnet50" if kw.pop("deep", True) else "resnet18", **kw).to(device)  # type: ignore[arg-type]
    classes = model.fc.out_features if hasattr(model, "fc") else 10

    def batch(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 3, image, image, device=device), torch.randint(0, classes, (n,), device=device))

    return Workload("resnet", model, batch, lambda out, y: F.cross_entropy(out, y))


def gpt_workload(device: torch.device, seq_len: int, vocab: int, **kw: object) -> Workload:
    model = build("gpt", seq_len=seq_len, vocab=vocab, **kw).to(device)  # type: ignore[arg-type]

    def batch(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, vocab, (n, seq_len + 1), device=device)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    return Workload("gpt", model, batch, lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))


# ------------------------------------------------------------------------------------------ stepping
class Mode:
    """How one training step keeps its saved activations."""

    def __init__(self, name: str, engine: Optional[SwapEngine] = None) -> None:
        self.name, self.engine = name, engine

    def context(self) -> contextlib.AbstractContextManager:
        if self.engine is not None:
            return self.engine
        if self.name == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()


def train_step(w: Workload, mode: Mode, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    with mode.context():
        loss = w.loss(w.model(x), y)
    loss.backward()
    opt.step()
    if mode.engine is not None:
        mode.engine.step_end()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(w: Workload, modes: List[Mode], batch: int, reps: int, warmup: int = 2) -> Dict[str, float]:
    """Median step seconds per mode; modes alternate every repetition so drift hits all alike."""
    device = next(w.model.parameters()).device
    opt = torch.optim.SGD(w.model.parameters(), lr=1e-3, momentum=0.9)
    x, y = w.make_batch(batch)
    times: Dict[str, List[float]] = {m.name: [] for m in modes}
    for rep in range(warmup + reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            sync(device)
            t0 = time.perf_counter()
            train_step(w, m, x, y, opt)
            sync(device)
            if rep >= warmup:
                times[m.name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------- CPU
def cpu_section(args: argparse.Namespace, rows: List[Row], results: Dict[str, object]) -> None:
    torch.manual_seed(0)
    dev = torch.device("cpu")
    workloads = [resnet_workload(dev, 32, deep=False, width=16, stem="cifar", num_classes=10),
                 gpt_workload(dev, seq_len=64, vocab=512, layers=2, width=128, heads=4)]
    for w, batch in zip(workloads, (args.cpu_batch, max(1, args.cpu_batch // 2))):
        idle = SwapEngine(SwapConfig(enabled=True, threshold=1 << 40, transport="loopback"), dev)
        full = SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, budget=0, prefetch=2,
                                     transport="loopback"), dev)
        # the same two engines with the memory timeline switched off: what recording it costs
        idle_norec = SwapEngine(SwapConfig(enabled=True, threshold=1 << 40, transport="loopback"), dev)
        full_norec = SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, budget=0, prefetch=2,
                                           transport="loopback"), dev)
        idle.record_memory = full.record_memory = True  # as with swap.trace set
        idle_norec.record_memory = full_norec.record_memory = False
        t = interleaved(w, [Mode("off"), Mode("idle", idle), Mode("swap_all", full), Mode("save_on_cpu"),
                            Mode("idle_norec", idle_norec), Mode("swap_all_norec", full_norec)],
                        batch, args.reps)
        samples = len(full.last_memory_timeline)
        sample_ns = memory_sample_ns(full_norec)
        idle_norec.close()
        full_norec.close()
        swapped = full.summary()
        idle.close()
        full.close()
        overhead = t["idle"] / t["off"] - 1
        ratio = t["swap_all"] / t["save_on_cpu"]
        rec_idle = t["idle"] / t["idle_norec"] - 1
        rec_swap = t["swap_all"] / t["swap_all_norec"] - 1
        sample_share = samples * sample_ns * 1e-9 / t["swap_all"]
        results[f"cpu_{w.name}"] = {"batch": batch, "median_step_s": t, "overhead": overhead,
                                    "memory_samples_per_step": samples, "memory_sample_ns": sample_ns,
                                    "memory_timeline_cost_idle": rec_idle, "memory_timeline_cost_swap_all": rec_swap,
                                    "swap_all_vs_save_on_cpu": ratio,
                                    "swap_bytes_per_step": swapped["swap_out_bytes"] / max(1, swapped["steps"])}
        rows += [
            Row("cpu", f"{w.name} b{batch} step off / engine idle (ms)", f"{t['off'] * 1e3:.1f} / {t['idle'] * 1e3:.1f}"),
            Row("cpu", f"{w.name} engine-on overhead, nothing swapped", f"{overhead * 100:+.1f} %", "<= 3 %"),
            Row("cpu", f"{w.name} swap-all loopback / save_on_cpu (ms)",
                f"{t['swap_all'] * 1e3:.1f} / {t['save_on_cpu'] * 1e3:.1f}"),
            Row("cpu", f"{w.name} memory timeline on/off, nothing swapped (ms)",
                f"{t['idle'] * 1e3:.1f} / {t['idle_norec'] * 1e3:.1f} ({rec_idle * 100:+.1f} %)", "<= 3 %"),
            Row("cpu", f"{w.name} memory timeline on/off, swap-all (ms)",
                f"{t['swap_all'] * 1e3:.1f} / {t['swap_all_norec'] * 1e3:.1f} ({rec_swap * 100:+.1f} %)", "<= 3 %"),
            Row("cpu", f"{w.name} memory timeline: samples/step x ns/sample",
                f"{samples} x {sample_ns:.0f} ns = {sample_share * 100:.2f} % of the step", "<= 3 %"),
            Row("cpu", f"{w.name} swap-all loopback vs save_on_cpu", f"{ratio:.2f}x time",
                f"{swapped['swap_out_bytes'] / max(1, swapped['steps']) / 2**20:.1f} MiB/step"),
        ]


def memory_sample_ns(engine: SwapEngine, calls: int = 100_000, reps: int = 9) -> float:
    """What recording one memory-timeline sample adds (ns): the bookkeeping call with recording on
    minus off, median of ``reps``, interleaved. Samples per step x this = the recording's share."""
    on: List[float] = []
    off: List[float] = []
    for _ in range(reps):
        for flag, out in ((True, on), (False, off)):
            engine.record_memory = flag
            engine._mem_log = []
            t0 = time.perf_counter()
            for _ in range(calls):
                engine._held_change(0)
            out.append((time.perf_counter() - t0) / calls * 1e9)
    engine._mem_log = []
    return max(0.0, statistics.median(on) - statistics.median(off))


# ----------------------------------------------------------------------------------------------- GPU
def bandwidth(device: torch.device, mib: int = 256) -> Tuple[float, float]:
    """Pinned host<->device GB/s (H2D, D2H)."""
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    out = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=True)
        sync(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        e1.record()
        e1.synchronize()
        out.append(5 * (mib << 20) / (e0.elapsed_time(e1) / 1e3) / 1e9)
    return out[0], out[1]


class Ckpt(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.body, x, use_reentrant=False)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Full activation checkpointing: every residual/transformer block recomputed in backward."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith(("Block", "Bottleneck", "BasicBlock")):
                setattr(parent, name, Ckpt(child))
    return model


def fits(w: Workload, mode: Mode, batch: int) -> bool:
    device = next(w.model.parameters()).device
    opt = torch.optim.SGD(w.model.parameters(), lr=1e-3, momentum=0.9)
    try:
        x, y = w.make_batch(batch)
        for _ in range(2):
            train_step(w, mode, x, y, opt)
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        for p in w.model.parameters():
            p.grad = None
        opt = None  # type: ignore[assignment]
        gc.collect()
        torch.cuda.empty_cache()


def max_batch(w: Workload, mode: Mode, limit: int) -> int:
    lo, hi = 0, 1
    while hi <= limit and fits(w, mode, hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > max(1, lo // 16):  # within ~6 %
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(w, mode, mid) else (lo, mid)
    return lo


def engine_for(device: torch.device, args: argparse.Namespace, cap: int) -> SwapEngine:
    return SwapEngine(SwapConfig(enabled=True, threshold=args.gpu_threshold, prefetch=args.gpu_prefetch,
                                 keep_last=args.gpu_keep_last, budget=int(cap * args.gpu_budget_frac)), device)


def gpu_section(args: argparse.Namespace, rows: List[Row], results: Dict[str, object]) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    h2d, d2h = bandwidth(device)
    results["bandwidth_gbps"] = {"h2d": h2d, "d2h": d2h}
    rows.append(Row("gpu", "pinned H2D / D2H bandwidth", f"{h2d:.1f} / {d2h:.1f} GB/s"))
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int(args.gpu_cap_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    rows.append(Row("gpu", "memory cap", f"{args.gpu_cap_gib:.1f} GiB"))
    makers = {"resnet50": lambda: resnet_workload(device, args.image, deep=True, stem="imagenet", num_classes=1000),
              "gpt": lambda: gpt_workload(device, seq_len=args.seq_len, vocab=8192, layers=12, width=768, heads=12)}
    for name, make in makers.items():
        torch.manual_seed(0)
        w = make()
        engine = engine_for(device, args, cap)
        b_plain = max_batch(w, Mode("plain"), args.max_batch)
        b_engine = max_batch(w, Mode("engine", engine), args.max_batch)
        ratio = b_engine / max(1, b_plain)
        rows.append(Row("gpu", f"{name} largest batch plain / engine", f"{b_plain} / {b_engine} ({ratio:.1f}x)", ">= 4x"))
        res: Dict[str, object] = {"max_batch_plain": b_plain, "max_batch_engine": b_engine}
        if b_plain == 0:
            results[f"gpu_{name}"] = res
            continue
        base = interleaved(w, [Mode("plain")], b_plain, args.gpu_reps)["plain"]
        thr_base = b_plain / base
        for k in (2, 4):
            b = b_plain * k
            modes = [Mode("engine", engine), Mode("save_on_cpu")]
            t = {}
            for m in modes:
                t[m.name] = interleaved(w, [m], b, args.gpu_reps)[m.name] if fits(w, m, b) else float("inf")
            ckpt_w = Workload(w.name, checkpoint_blocks(make()), w.make_batch, w.loss)
            t["checkpoint"] = (interleaved(ckpt_w, [Mode("plain")], b, args.gpu_reps)["plain"]
                               if fits(ckpt_w, Mode("plain"), b) else float("inf"))
            del ckpt_w
            rel = (b / t["engine"]) / thr_base
            s = engine.summary()
            gbps = (s["swap_out_bytes"] + s["swap_in_bytes"]) / max(1e-9, (s["swap_out_ms"] + s["swap_in_ms"]) / 1e3) / 1e9
            res[f"{k}x"] = {"batch": b, "step_s": t, "relative_throughput": rel, "swap_gbps": gbps,
                            "vs_save_on_cpu": t["save_on_cpu"] / t["engine"], "vs_checkpoint": t["checkpoint"] / t["engine"]}
            rows += [
                Row("gpu", f"{name} {k}x oversubscription throughput vs in-memory", f"{rel * 100:.0f} %",
                    ">= 85 %" if k == 2 else ""),
                Row("gpu", f"{name} {k}x engine vs save_on_cpu(pin) / vs checkpoint",
                    f"{t['save_on_cpu'] / t['engine']:.2f}x / {t['checkpoint'] / t['engine']:.2f}x", ">= 1.5x save_on_cpu"),
                Row("gpu", f"{name} {k}x achieved swap GB/s (of measured)",
                    f"{gbps:.1f} ({gbps / max(h2d, d2h) * 100:.0f} %)"),
            ]
        engine.close()
        results[f"gpu_{name}"] = res
        del w
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- output
def table(rows: List[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows + [Row("section", "metric", "value", "goal")])
              for f in ("section", "metric", "value", "goal")]
    lines = []
    for r in [Row("section", "metric", "value", "goal")] + rows:
        lines.append("| " + " | ".join(getattr(r, f).ljust(wd) for f, wd in
                                        zip(("section", "metric", "value", "goal"), widths)) + " |")
    lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(lines)


def plot(results: Dict[str, object], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    labels, values = [], []
    for key, res in results.items():
        if key.startswith("cpu_"):
            labels += [f"{key[4:]}\nidle/off", f"{key[4:]}\nswap-all/save_on_cpu"]
            values += [1 + res["overhead"], res["swap_all_vs_save_on_cpu"]]  # type: ignore[index]
        elif key.startswith("gpu_"):
            for k in ("2x", "4x"):
                if k in res:  # type: ignore[operator]
                    labels.append(f"{key[4:]} {k}\nthroughput vs in-mem")
                    values.append(res[k]["relative_throughput"])  # type: ignore[index]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ratio")
    ax.set_title("lmsdp swap engine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--reps", type=int, default=15, help="interleaved CPU repetitions (median)")
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-cap-gib", type=float, default=8.0)
    p.add_argument("--gpu-budget-frac", type=float, default=0.4, help="engine budget as a fraction of the cap")
    p.add_argument("--gpu-threshold", type=int, default=1 << 20)
    p.add_argument("--gpu-prefetch", type=int, default=2)
    p.add_argument("--gpu-keep-last", type=int, default=2)
    p.add_argument("--gpu-reps", type=int, default=5)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=4096)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    rows: List[Row] = []
    results: Dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.gpu_only:
        cpu_section(args, rows, results)
    if not args.cpu_only:
        if torch.cuda.is_available():
            gpu_section(args, rows, results)
        else:
            rows.append(Row("gpu", "skipped", "no CUDA device"))
    print(table(rows))
    with open(os.path.join(args.out_dir, "swap_bench.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    plot(results, os.path.join(args.out_dir, "swap_bench.png"))
    print(f"wrote {args.out_dir}/swap_bench.json and swap_bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
