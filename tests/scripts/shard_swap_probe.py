"""Run as each rank of ``mpirun -np 2``: the zoo GPT under ``strategy: shard`` (FSDP2) with the swap
engine swapping every saved tensor it may. FSDP's gathered (unsharded) parameters of every block and of the
root are collected in forward pre-hooks that run after FSDP's own all-gather; with ``reshard_after_forward:
false`` they stay allocated for the whole step, so their storage addresses cannot be reused by
anything else within the step. Each swap-out's storage is checked against them. Rank 0 writes JSON to argv[1]:
``gathered`` (distinct gathered storages), ``seen`` (saved tensors on those storages that reached the
engine's pack hook), ``swapped_fsdp`` (swap-outs of such storages: must be 0), ``swapped`` (all)."""
import json
import sys

import torch

from lmsdp.comm import CommConfig, get_backend
from lmsdp.comm.strategy import get_strategy
from lmsdp.launcher.models import build_model
from lmsdp.swapping import SwapEngine
from lmsdp.swapping.config import SwapConfig


def main() -> None:
    torch.set_num_threads(1)
    config = CommConfig(backend="torch", strategy="shard", reshard_after_forward=False)
    backend = get_backend(config)
    strategy = get_strategy(config, backend)
    torch.manual_seed(0)
    model = strategy.prepare_model(build_model("gpt", vocab=64, seq_len=16, layers=2, width=32, heads=4))
    gathered = {}

    def collect(module, _inputs):  # registered after fully_shard: runs after FSDP's unshard
        for p in module.parameters():  # the root sees the blocks' still-sharded DTensors: skipped
            if not hasattr(p, "to_local"):  # a plain tensor: FSDP's gathered parameter, not the DTensor shard
                gathered[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()

    for module in [*strategy.units, model]:
        module.register_forward_pre_hook(collect)
    engine = SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, prefetch=2, transport="loopback"), "cpu")
    seen, swapped, swapped_fsdp = [0], [0], [0]
    pack, swap_out = engine._pack, engine.swap_out

    def spy_pack(t):
        if t.untyped_storage().data_ptr() in gathered:
            seen[0] += 1
        return pack(t)

    def spy_swap_out(handle):
        swapped[0] += 1
        if handle.tensor.untyped_storage().data_ptr() in gathered:
            swapped_fsdp[0] += 1
        return swap_out(handle)

    engine._pack, engine.swap_out = spy_pack, spy_swap_out
    optimizer = strategy.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    generator = torch.Generator().manual_seed(1 + backend.rank)
    for _ in range(2):
        gathered.clear()  # only storages gathered in this step: freed ones may be reused
        tokens = torch.randint(0, 64, (4, 16), generator=generator)
        with engine:
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step_end()
    counts = backend.allgather_object({"gathered": len(gathered), "seen": seen[0], "swapped": swapped[0],
                                       "swapped_fsdp": swapped_fsdp[0]})
    if backend.rank == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as handle:
            json.dump(counts, handle)
    engine.close()
    backend.shutdown()


if __name__ == "__main__":
    main()
