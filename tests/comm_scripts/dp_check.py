"""Data-parallel checks of one comm backend, run as every rank of a real job (mpirun, horovodrun
--gloo, or a single process). Rank 0 writes everything as JSON to argv's --result; the pytest side
(tests/test_comm_*.py) compares. Sections:

broadcast   ranks start from different weights/optimizer state; after broadcast_state all equal rank 0's
train       K SGD steps on each rank's shard of a global batch: final params (and their sha256 per rank),
            the same run without any comm on the full batch (local reference), step_stats per step
fp16        the same K steps with fp16 compression
objects     allgather_object of a list on rank 0 and None on the others (different types and sizes)
bpps        backward_passes_per_step=2: after the 1st backward nothing is reduced and grads differ across
            ranks; after the 2nd (+ synchronize) grads are identical and equal the average over ranks of
            the summed micro-batch gradients
swap        (--swap) the train section with lmsdp's SwapEngine (loopback) around forward
dead        (--dead) rank 1 exits abruptly at step 2; rank 0 reports the CommError and how long it took
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import torch

from lmsdp.comm import CommConfig, CommError, get_backend

IN, HID, OUT = 8, 16, 4


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, HID),
                               torch.nn.Tanh(), torch.nn.Linear(HID, OUT))


def data(steps: int, global_batch: int, seed: int = 1234) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(global_batch, IN, generator=g), torch.randn(global_batch, OUT, generator=g))
            for _ in range(steps)]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def train(backend: Any, args: argparse.Namespace, engine: Any = None, **cfg_overrides: Any) -> Dict[str, Any]:
    """K steps of SGD with momentum on this rank's shard; also the no-comm full-batch reference."""
    base_cfg = backend.config
    backend.config = dataclasses.replace(base_cfg, **cfg_overrides)
    try:
        r, n, b = backend.rank, backend.size, args.batch
        batches = data(args.steps, n * b)
        model = make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        backend.broadcast_state(model, opt)
        opt = backend.wrap_optimizer(opt, model)
        stats, losses, swap_stats = [], [], []
        for x, y in batches:
            xs, ys = x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]
            opt.zero_grad()
            if engine is not None:
                with engine:
                    loss = loss_fn(model, xs, ys)
            else:
                loss = loss_fn(model, xs, ys)
            loss.backward()
            if engine is not None:
                swap_stats.append({k: v for k, v in engine.step_end().items()
                                   if isinstance(v, (int, float))})
            opt.step()
            losses.append(float(backend.allreduce(loss.detach(), op="average")))
            stats.append(backend.step_stats())
        p = flat(model)
        # reference: one process, the whole global batch, plain SGD
        ref = make_model(0)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        for x, y in batches:
            ref_opt.zero_grad()
            loss_fn(ref, x, y).backward()
            ref_opt.step()
        return {"params": p.tolist(), "sha": backend.allgather_object(sha(p)),
                "ref_max_diff": float((p - flat(ref)).abs().max()), "stats": stats, "losses": losses,
                "swap_stats": swap_stats}
    finally:
        backend.config = base_cfg


def broadcast_section(backend: Any) -> Dict[str, Any]:
    """Different start on every rank (weights and Adam state only on rank 0) -> rank 0's after."""
    model = make_model(100 + backend.rank)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    if backend.rank == 0:  # rank 0 has optimizer state (as after a resume); the others do not
        loss_fn(model, torch.randn(4, IN), torch.randn(4, OUT)).backward()
        opt.step()
    before = backend.allgather_object(sha(flat(model)))
    rank0_before = before[0]
    backend.broadcast_state(model, opt)
    after = backend.allgather_object(sha(flat(model)))
    st = opt.state_dict()["state"]
    opt_sha = sha(torch.cat([st[k]["exp_avg"].reshape(-1) for k in sorted(st)])) if st else "empty"
    return {"before": before, "after": after, "rank0_before": rank0_before,
            "opt_after": backend.allgather_object(opt_sha)}


def bpps_section(backend: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """backward_passes_per_step=2: reduce only in the 2nd backward."""
    base_cfg = backend.config
    backend.config = dataclasses.replace(base_cfg, backward_passes_per_step=2)
    try:
        r, n, b = backend.rank, backend.size, args.batch
        (x1, y1), (x2, y2) = data(2, n * b, seed=99)
        model = make_model(0)
        opt = backend.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)
        backend.step_stats()
        opt.zero_grad()
        loss_fn(model, x1[r * b:(r + 1) * b], y1[r * b:(r + 1) * b]).backward()
        after1 = backend.step_stats()
        g1 = backend.allgather_object(sha(grads(model)))
        loss_fn(model, x2[r * b:(r + 1) * b], y2[r * b:(r + 1) * b]).backward()
        opt.synchronize()
        after2 = backend.step_stats()
        g = grads(model)
        g2 = backend.allgather_object(sha(g))
        # expected: mean over ranks of (grad of micro-batch 1 + grad of micro-batch 2)
        exp = None
        for q in range(n):
            ref = make_model(0)
            loss_fn(ref, x1[q * b:(q + 1) * b], y1[q * b:(q + 1) * b]).backward()
            loss_fn(ref, x2[q * b:(q + 1) * b], y2[q * b:(q + 1) * b]).backward()
            exp = grads(ref) if exp is None else exp + grads(ref)
        exp = exp / n
        opt.step()
        return {"after_first": after1, "grad_sha_first": g1, "after_second": after2,
                "grad_sha_second": g2, "expected_max_diff": float((g - exp).abs().max())}
    finally:
        backend.config = base_cfg


def dead_section(backend: Any, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Rank 1 exits abruptly (``--dead exit``) or stops answering (``--dead hang``) at step 2; rank 0
    must get a CommError within the timeout."""
    r, b = backend.rank, args.batch
    batches = data(6, backend.size * b)
    model = make_model(0)
    opt = backend.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)
    t0 = time.monotonic()
    for i, (x, y) in enumerate(batches):
        if i == 2 and r == 1:
            if args.dead == "hang":
                time.sleep(args.timeout * 4)  # alive but silent; the test kills it if still here
            # no cleanup, no goodbye: like a crash (exit0: status 0, so horovodrun does not race
            # rank 0 by tearing the job down itself)
            os._exit(0 if args.dead == "exit0" else 17)
        t0 = time.monotonic()
        try:
            opt.zero_grad()
            loss_fn(model, x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]).backward()
            opt.step()
            backend.allreduce(torch.ones(1))
        except CommError as exc:
            return {"step": i, "error": str(exc), "type": type(exc).__name__, "peer": exc.peer,
                    "backend": exc.backend, "elapsed_s": time.monotonic() - t0}
    return {"step": None, "error": None, "elapsed_s": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--result", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="per-rank batch")
    ap.add_argument("--sections", default="broadcast,train,fp16,bpps,objects")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--bucket-bytes", type=int, default=600, help="fusion threshold / bucket bytes")
    ap.add_argument("--chrome-trace", default=None)
    ap.add_argument("--dead", choices=("exit", "exit0", "hang"), default="exit", help="how rank 1 fails")
    args = ap.parse_args()
    cfg = CommConfig(backend=args.backend, timeout_s=args.timeout, fusion_threshold=args.bucket_bytes,
                     timeline=args.chrome_trace)
    backend = get_backend(cfg)
    out: Dict[str, Any] = {"backend": backend.name, "rank": backend.rank, "size": backend.size,
                           "local_size": backend.local_size,
                           "description": getattr(backend, "description", backend.name)}
    try:
        for section in args.sections.split(","):
            if section == "broadcast":
                out["broadcast"] = broadcast_section(backend)
            elif section == "train":
                out["train"] = train(backend, args)
            elif section == "fp16":
                out["fp16"] = train(backend, args, compression="fp16")
            elif section == "bpps":
                out["bpps"] = bpps_section(backend, args)
            elif section == "objects":  # ranks pass objects of different types and sizes
                out["objects"] = backend.allgather_object(["rank 0's list"] if backend.rank == 0 else None)
            elif section == "swap":
                from lmsdp.swapping import SwapConfig, SwapEngine
                engine = SwapEngine(SwapConfig(enabled=True, threshold=0, prefetch=2, keep_last=0,
                                               transport="loopback"), "cpu")
                out["swap_on"] = train(backend, args, engine=engine)
                out["swap_off"] = train(backend, args)
            elif section == "dead":
                res = dead_section(backend, args)
                out["dead"] = res
                with open(args.result, "w") as f:
                    json.dump(out, f)
                sys.stdout.flush()
                sys.stderr.flush()
                # the peer is gone: a clean MPI_Finalize could wait on it; leave at once
                os._exit(0)
        out["trace"] = backend.trace_path
        backend.barrier()
    except Exception:
        out["exception"] = traceback.format_exc()
        if backend.rank == 0:
            with open(args.result, "w") as f:
                json.dump(out, f)
        raise
    finally:
        backend.shutdown()
    if backend.rank == 0:
        with open(args.result, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
