"""Run as each rank of ``mpirun -np 2``: float16 loss scaling under ``strategy: shard`` (FSDP2) with
the strategy's own scaler. Three steps of the zoo GPT: (1) unscaled gradients equal those of a
backward without scaling; (2) a finite step moves the parameters; (3) an inf put into rank 1's
gradient shard only makes *both* ranks skip the step and halve the scale. Rank 0 writes every
rank's findings as JSON to argv[1], with every warning raised in the steps."""
import json
import sys
import warnings

import torch

from lmsdp.comm import CommConfig, get_backend
from lmsdp.comm.strategy import get_strategy
from lmsdp.launcher.models import build_model


def main() -> None:
    torch.set_num_threads(1)
    config = CommConfig(backend="torch", strategy="shard")
    backend = get_backend(config)
    strategy = get_strategy(config, backend)
    torch.manual_seed(0)
    model = strategy.prepare_model(build_model("gpt", vocab=64, seq_len=16, layers=2, width=32, heads=4))
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    scaler = strategy.grad_scaler(torch.device("cpu"), enabled=True)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1 + backend.rank))
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())

    def shards(grads: bool = False):
        return [(p.grad if grads else p).to_local().detach().clone() for p in params]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.zero_grad()
        loss().backward()
        reference = shards(grads=True)
        optimizer.zero_grad()
        scaler.scale(loss()).backward()
        scaler.unscale_(optimizer)
        unscaled = all(torch.allclose(g, r, rtol=1e-4, atol=1e-8) for g, r in zip(shards(grads=True), reference))
        before = shards()
        scaler.step(optimizer)
        scaler.update()
        finite_moved = any(not torch.equal(a, b) for a, b in zip(before, shards()))
        scale_after_finite = scaler.get_scale()

        optimizer.zero_grad()
        scaler.scale(loss()).backward()
        if backend.rank == 1:
            local = next(p.grad.to_local() for p in params if p.grad.to_local().numel())
            local.view(-1)[0] = float("inf")
        before = shards()
        scaler.step(optimizer)
        scaler.update()
        inf_moved = any(not torch.equal(a, b) for a, b in zip(before, shards()))
    mine = {"rank": backend.rank, "scaler": type(scaler).__name__, "unscaled_equal_reference": unscaled,
            "finite_step_moved": finite_moved, "scale_after_finite": scale_after_finite,
            "inf_step_moved": inf_moved, "scale_after_inf": scaler.get_scale(),
            "warnings": [str(w.message).splitlines()[0] for w in caught]}
    every = backend.allgather_object(mine)
    if backend.rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(every, handle)
    backend.shutdown()


if __name__ == "__main__":
    main()
