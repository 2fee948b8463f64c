"""A model factory for failure tests: a tiny CNN whose forward fails on one rank at one step.

``fail``: "raise" (a RuntimeError), "raise-closed" (closes its stdout and stderr, then raises),
"raise-flood" (prints 20000 lines, then raises), "kill" (SIGKILL to itself), "exit" (os._exit(3)),
"hang" (sleeps forever inside forward, as a rank stuck in a collective would). The rank comes from the launcher's
variables, so this file works under mpirun and torchrun alike; it does not import lmsdp."""
import os
import signal
import time

import torch
from torch import nn


def _rank() -> int:
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


class Failing(nn.Module):
    def __init__(self, fail_rank: int, fail_step: int, fail: str, classes: int, delay: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, classes))
        self.calls, self.fail_rank, self.fail_step, self.fail = 0, fail_rank, fail_step, fail
        self.delay = delay  # seconds per forward, so a test can act while steps run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_step and _rank() == self.fail_rank:
            if self.fail == "raise":
                raise RuntimeError(f"injected failure at step {self.calls}")
            if self.fail == "raise-closed":
                os.close(1)
                os.close(2)
                raise RuntimeError(f"silent failure at step {self.calls}")
            if self.fail == "raise-flood":
                for i in range(20000):
                    print(f"noise line {i}", flush=False)
                raise RuntimeError(f"flooded failure at step {self.calls}")
            if self.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail == "exit":
                os._exit(3)
            if self.fail == "hang":
                time.sleep(3600)
        if self.delay:
            time.sleep(self.delay)
        return self.body(x)


def make(fail_rank: int = 1, fail_step: int = 3, fail: str = "none", classes: int = 10,
         delay: float = 0.0) -> nn.Module:
    return Failing(fail_rank, fail_step, fail, classes, delay)
