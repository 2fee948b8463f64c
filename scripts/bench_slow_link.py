#!/usr/bin/env python
"""Slow-link benchmark on CPU: a SIMULATION of a GPU's device<->host link speed, not a GPU figure.

The loopback transport's copies are paced to ``swap.link_gbps``, set so that the CPU's measured matmul
FLOP/s per link byte/s equals a GPU's (default 6000 FLOP per byte: an A100's ~150 TFLOP/s achieved over
a ~25 GB/s PCIe 4 link). At one batch, side by side (modes interleaved, medians):

* in-memory: saved activations stay put;
* engine: every saved tensor >= threshold swapped over the paced link, prefetched in the learned order;
* save_on_cpu (simulated): torch's ``save_on_cpu`` copies on the compute stream, so compute waits for
  each copy; here each pack and unpack copies and then sleeps out the link time of its bytes;
* full checkpointing: every block recomputed in backward (no link traffic).

    python scripts/bench_slow_link.py [--flop-per-byte 6000] [--reps 5]   # markdown table on stdout
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.rates import device_flops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_swap import (Mode, Workload, checkpoint_blocks, gpt_workload, interleaved,  # noqa: E402
                        resnet_workload)

warnings.filterwarnings("ignore", message="lmsdp swap")


class PacedSaveOnCpu(Mode):
    """``save_on_cpu`` over a link of ``link_bps``: the copy blocks compute for its link time."""

    def __init__(self, link_bps: float, threshold: int) -> None:
        super().__init__("save_on_cpu (simulated)")
        self.link_bps, self.threshold = link_bps, threshold

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = t.detach().clone()
        delay = t0 + t.nbytes / self.link_bps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return out

    def context(self) -> contextlib.AbstractContextManager:
        def pack(t: torch.Tensor) -> Any:
            if t.nbytes < self.threshold or (t.requires_grad and t.is_leaf):
                return (False, t)
            return (True, self._move(t))

        def unpack(packed: Tuple[bool, torch.Tensor]) -> torch.Tensor:
            moved, t = packed
            return self._move(t) if moved else t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def bench(w: Workload, ckpt: Workload, batch: int, link_bps: float, args: argparse.Namespace) -> Dict[str, Any]:
    engine = SwapEngine(SwapConfig(enabled=True, transport="loopback", threshold=args.threshold, keep_last=1,
                                   prefetch=64, link_gbps=link_bps / 1e9), "cpu")
    try:
        t = interleaved(w, [Mode("in-memory"), Mode("engine", engine), PacedSaveOnCpu(link_bps, args.threshold)],
                        batch, args.reps)
        stats = engine.last_stats
    finally:
        engine.close()
    t["full checkpointing"] = interleaved(ckpt, [Mode("full checkpointing")], batch, args.reps)["full checkpointing"]
    return {"times": t, "swapped_mib": stats["swap_out_bytes"] / 2**20, "hidden": stats["hidden_frac"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flop-per-byte", type=float, default=6000.0,
                        help="GPU FLOP/s per link byte/s to reproduce (default 6000: A100 over PCIe 4)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threshold", type=int, default=1 << 16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    flops = device_flops(cpu)
    link_bps = flops / args.flop_per_byte
    print(f"CPU matmul {flops / 1e9:.1f} GFLOP/s (1 thread) / {args.flop_per_byte:g} FLOP per byte "
          f"-> simulated link {link_bps / 1e9:.4f} GB/s per direction (swap.link_gbps)\n")
    cases = [("ResNet-18 (width 16, 32x32)", 16,
              lambda: resnet_workload(cpu, 32, deep=False, width=16, stem="cifar", num_classes=10)),
             ("GPT (2 layers, width 128, seq 64)", 8,
              lambda: gpt_workload(cpu, seq_len=64, vocab=512, layers=2, width=128, heads=4))]
    print("| model | batch | swapped / step | in-memory | engine | save_on_cpu (simulated) | full checkpointing "
          "| engine hidden | engine vs save_on_cpu |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, batch, make in cases:
        w = make()
        base = make()
        ckpt = Workload(base.name, checkpoint_blocks(base.model), base.make_batch, base.loss)
        r = bench(w, ckpt, batch, link_bps, args)
        t = r["times"]
        ms = {k: f"{v * 1e3:.0f} ms ({v / t['in-memory']:.2f}x)" for k, v in t.items()}
        print(f"| {label} | {batch} | {r['swapped_mib']:.1f} MiB | {ms['in-memory']} | {ms['engine']} | "
              f"{ms['save_on_cpu (simulated)']} | {ms['full checkpointing']} | {r['hidden']:.2f} | "
              f"{t['save_on_cpu (simulated)'] / t['engine']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
