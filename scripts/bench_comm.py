#!/usr/bin/env python
"""2-rank data-parallel step time: Horovod (MPI and Gloo controllers) vs lmsdp's torch backend vs
torch DistributedDataParallel (gloo), same model, data, bucket/fusion size and threads; median of
the measured steps, with the allreduce wall time and the part of it hidden behind backward.

    .venv/bin/python scripts/bench_comm.py [--rounds 2] [--steps 20] [--width 1024] [--layers 4] [--batch 64]

The parent launches one 2-rank job per variant (``mpirun -np 2`` or ``horovodrun --gloo -np 2``),
each rank runs this file with ``--worker``, rank 0 writes JSON, the parent prints one table with the
ratios to DDP side by side. DDP's reductions are timed through a comm hook that does exactly what
its default hook does (divide, async all_reduce of the bucket) plus timestamps, so all variants use
the same timing model (lmsdp.comm.timing). Single-process (no comm) step time is the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("single", "horovod-mpi", "horovod-gloo", "torch-backend", "torch-ddp")


def build_model(width: int, layers: int) -> Any:
    import torch
    torch.manual_seed(0)
    mods: List[Any] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    mods.append(torch.nn.Linear(width, 16))
    return torch.nn.Sequential(*mods)


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: warm up, then time ``--steps`` full steps."""
    import torch
    import torch.distributed as dist

    from lmsdp.comm import CommConfig, get_backend
    from lmsdp.comm.timing import BackwardWatcher, StepTimer

    torch.set_num_threads(args.threads)
    cfg = CommConfig(backend="torch" if args.variant.startswith("torch") else "horovod",
                     fusion_threshold=args.bucket_mb << 20, cycle_time_ms=args.cycle_ms, timeout_s=60)
    model = build_model(args.width, args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    timer: Optional[StepTimer] = None
    if args.variant == "single":
        rank, size, backend = 0, 1, None
    elif args.variant == "torch-ddp":
        backend = get_backend(cfg)  # only for the rendezvous (mpi4py) and the process group
        rank, size = backend.rank, backend.size
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
        timer = StepTimer()
        seq = [0]

        def timed_allreduce(state, bucket):  # no annotations: DDP checks them against GradBucket
            # == torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook, timed
            buf = bucket.buffer().div_(size)
            key = seq[0]
            seq[0] += 1
            timer.started(key, buf.numel() * buf.element_size())
            fut = dist.all_reduce(buf, async_op=True).get_future()

            def done(f: Any) -> Any:
                timer.finished(key)
                return f.value()[0]
            return fut.then(done)

        model.register_comm_hook(None, timed_allreduce)
        BackwardWatcher([p for p in model.parameters()], timer.backward_ended)
    else:
        backend = get_backend(cfg)
        rank, size = backend.rank, backend.size
        backend.broadcast_state(model, opt)
        opt = backend.wrap_optimizer(opt, model)
        timer = backend.timer
    g = torch.Generator().manual_seed(1 + rank)
    xs = [torch.randn(args.batch, args.width, generator=g) for _ in range(4)]
    ys = [torch.randn(args.batch, 16, generator=g) for _ in range(4)]
    times: List[float] = []
    stats: List[Dict[str, float]] = []
    for i in range(args.warmup + args.steps):
        if backend is not None and args.variant != "single":
            backend.barrier()  # every step starts together: step time is not a queue effect
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs[i % 4]), ys[i % 4])
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        s = timer.collect() if timer is not None else {}
        if args.variant == "torch-ddp":
            # DDP's wait happens inside backward (its final callback); exposed = reduction after bwd end
            s["comm_wait_ms"] = round(s["allreduce_ms"] * (1 - s["allreduce_hidden_frac"]), 4)
        if i >= args.warmup:
            times.append((t1 - t0) * 1000.0)
            stats.append(s)
    result = {"variant": args.variant, "size": size, "step_ms": times, "stats": stats,
              "params": sum(p.numel() for p in model.parameters())}
    if backend is not None:
        result["description"] = getattr(backend, "description", backend.name)
        if args.variant == "torch-ddp":
            result["description"] = "torch DDP (gloo)"
        backend.shutdown()
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))


def launch(variant: str, args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "HOROVOD_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(args.threads), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant,
          "--result", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--width", str(args.width), "--layers", str(args.layers), "--batch", str(args.batch),
          "--bucket-mb", str(args.bucket_mb), "--cycle-ms", str(args.cycle_ms),
          "--threads", str(args.threads)]
    if variant == "single":
        cmd = me
    elif variant == "horovod-gloo":
        cmd = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"] + me
    else:
        cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"] + me
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{variant} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="single", choices=VARIANTS)
    ap.add_argument("--result", default="")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    ap.add_argument("--bucket-mb", type=int, default=4, help="Horovod fusion threshold = DDP/lmsdp bucket size")
    ap.add_argument("--cycle-ms", type=float, default=1.0, help="Horovod cycle time")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin repetitions of all variants")
    ap.add_argument("--json", default=None, help="also write all results here")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from lmsdp.comm import horovod_available
    variants = [v for v in args.variants.split(",") if v]
    if not horovod_available():
        print("horovod.torch does not import: Horovod variants skipped", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("horovod")]
    if shutil.which("mpirun") is None:
        sys.exit("bench_comm: mpirun not found")
    results: Dict[str, Dict[str, Any]] = {}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # round-robin: on a shared machine, load drifts; every variant sees every phase of it
        for rnd in range(args.rounds):
            for v in variants:
                print(f"[bench_comm] round {rnd + 1}/{args.rounds}: {v} ...", file=sys.stderr, flush=True)
                r = launch(v, args, Path(tmp) / f"{v}-{rnd}.json")
                if v in results:
                    results[v]["step_ms"] += r["step_ms"]
                    results[v]["stats"] += r["stats"]
                else:
                    results[v] = r
    load1 = os.getloadavg()[0]
    base = results.get("torch-ddp")
    base_ms = med(base["step_ms"]) if base else None
    params = next(iter(results.values()))["params"]
    print(f"model: {args.layers}x Linear({args.width},{args.width}) + head, {params / 1e6:.2f} M params "
          f"({params * 4 / 2**20:.1f} MiB fp32 grads); batch {args.batch}/rank; bucket/fusion "
          f"{args.bucket_mb} MiB; cycle {args.cycle_ms} ms; {args.threads} thread/rank; "
          f"median of {args.rounds} rounds x {args.steps} steps (each after {args.warmup} warm-up); "
          f"{os.cpu_count()} cores, load average {load0:.1f} -> {load1:.1f}")
    head = ("| variant | ranks | step ms (median) | vs DDP | allreduce ms | hidden frac | comm wait ms |"
            " reductions/step |")
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, r in results.items():
        ms = med(r["step_ms"])
        st = r["stats"]
        ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
        if st and st[0]:
            ar = f"{med([s['allreduce_ms'] for s in st]):.2f}"
            hid = f"{med([s['allreduce_hidden_frac'] for s in st]):.2f}"
            wait = f"{med([s['comm_wait_ms'] for s in st]):.2f}"
            cnt = f"{med([s['allreduce_count'] for s in st]):.0f}"
        else:
            ar = hid = wait = cnt = "-"
        name = r.get("description", "1 process, no comm") if v != "single" else "1 process, no comm"
        print(f"| {v}: {name} | {r['size']} | {ms:.1f} | {ratio} | {ar} | {hid} | {wait} | {cnt} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
