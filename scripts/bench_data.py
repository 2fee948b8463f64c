"""Loader benchmark (issue 22): a Dataset with I/O-like latency per sample (default 2 ms, a sleep, as a
file read or a decode would cost), batch 16, one rank in this process; samples/s of

  synthetic         the same model on synthetic data (no latency: the ceiling)
  one-by-one        the slow Dataset read in the training process (data.workers: 0, as before)
  workers           the slow Dataset through DataLoader workers (data.workers: N)

measured side by side in one run (median of the steps after warm-up). Prints a table.

    .venv/bin/python scripts/bench_data.py [--latency-ms 2] [--workers 2] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class SlowImages(torch.utils.data.Dataset):
    """CIFAR-shaped samples that each cost ``latency_ms`` to 'read' (a sleep: the CPU stays free)."""

    def __init__(self, samples: int = 4096, latency_ms: float = 2.0) -> None:
        self.samples, self.latency = samples, latency_ms / 1e3

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int):
        time.sleep(self.latency)
        gen = torch.Generator().manual_seed(index)
        return torch.randn(3, 32, 32, generator=gen), torch.randint(0, 10, [], generator=gen)


def slow_images(samples: int = 4096, latency_ms: float = 2.0) -> SlowImages:
    return SlowImages(samples, latency_ms)


def measure(overrides, steps: int, warmup: int, threads: int) -> float:
    from lmsdp.launcher.config import load_config
    from lmsdp.launcher.train.trainer import run_worker
    from lmsdp.runtime.topology import detect_topology

    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, ["model.name=resnet18", "model.kwargs={width: 16, num_classes: 10, stem: cifar}",
                                    "data.shape=[3, 32, 32]", "train.batch_size=16", f"train.steps={steps}",
                                    "train.progress=false", "comm.backend=torch", f"train.output_dir={out}",
                                    f"launch.threads={threads}",  # the same intra-op threads in every row
                                    *overrides])
        assert run_worker(config, detect_topology()) == 0
        with open(os.path.join(out, "metrics.rank0.jsonl")) as handle:
            rates = [json.loads(line)["samples_per_s"] for line in handle][warmup:]
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the rank, every row")
    args = parser.parse_args()
    sys.path.insert(0, HERE)  # this file is the data factory too
    slow = ["data.kind=factory", "data.factory=bench_data:slow_images", f"data.kwargs={{latency_ms: {args.latency_ms}}}"]
    rows = [("synthetic", measure(["data.kind=synthetic", "data.classes=10"], args.steps, args.warmup, args.threads)),
            ("one-by-one (workers 0)", measure(slow + ["data.workers=0"], args.steps, args.warmup, args.threads)),
            (f"workers {args.workers}", measure(slow + [f"data.workers={args.workers}"], args.steps, args.warmup, args.threads))]
    ceiling = rows[0][1]
    print(f"# {args.latency_ms} ms per sample, batch 16, ResNet-18 (width 16) on CPU, {args.threads} intra-op thread(s)")
    print(f"| {'data':<24} | samples/s | of synthetic |")
    print(f"|{'-' * 26}|----------:|-------------:|")
    for name, rate in rows:
        print(f"| {name:<24} | {rate:9.1f} | {rate / ceiling:12.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
