"""A plain Horovod training script, as a user would write it; it never touches the lmsdp package.

hvd.init, pin threads, DistributedOptimizer, broadcast_parameters; a small CNN on random data.
Prints ``FIRST_STEP <unix time>`` after the first optimizer step (the launch benchmark reads it)
and ``DONE rank=<r> steps=<n>`` at the end (``--done-words``: ``print("DONE", rank, flush=True)``, four writes
with unbuffered output). ``--fail-rank R --fail-step S`` raises there."""
import argparse
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=-1)
    parser.add_argument("--done-words", action="store_true")
    parser.add_argument("--marker", default="", help="ignored; lets tests find this job's processes")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    generator = torch.Generator().manual_seed(hvd.rank())
    for step in range(1, args.steps + 1):
        if hvd.rank() == args.fail_rank and step == args.fail_step:
            raise RuntimeError(f"script failure on rank {hvd.rank()} at step {step}")
        x = torch.randn(args.batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (args.batch,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step == 1:
            print(f"FIRST_STEP {time.time():.6f}", flush=True)
        if hvd.rank() == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    if args.done_words:
        print("DONE", hvd.rank(), flush=True)
    else:
        print(f"DONE rank={hvd.rank()} steps={args.steps}", flush=True)


if __name__ == "__main__":
    main()
