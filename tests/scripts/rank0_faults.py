"""Model factories that fail on task 0 only, at the points where a real job fails (the other tasks
go on and wait for it): the tests that show one failing task ends the whole srun step
(tests/test_slurm_failures.py). ``failing_model:make(fail_rank=0, fail="raise")`` covers training;
``rank0_import_fails`` covers a factory module that cannot be imported on one node."""
import os
import time

from torch import nn


def on_task_zero() -> bool:
    for name in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return os.environ[name] == "0"
    return True


def _model(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), nn.Linear(width, 10))


def build_fails(width: int = 4) -> nn.Module:
    """Model build: task 0's factory raises (the config check, which only imports it, passed)."""
    if on_task_zero():
        raise RuntimeError("injected: task 0 cannot build its model")
    return _model(width)


def build_fails_while_peers_build_slowly(width: int = 4) -> nn.Module:
    """Task 0's build fails while the others take minutes to build theirs (a large model): they do not
    reach MPI's start-up, so task 0 cannot MPI_Abort and must cancel the step instead."""
    if on_task_zero():
        raise RuntimeError("injected: task 0 cannot build its model")
    time.sleep(600)
    return _model(width)


def rendezvous_fails(width: int = 4) -> nn.Module:
    """Rendezvous: on task 0 the backend's start raises (Horovod's init before MPI is up; the torch
    backend's store after MPI is up), as an unresolvable or unreachable address would."""
    if on_task_zero():
        import torch.distributed as dist

        def refuse(*_args, **_kwargs):
            raise RuntimeError("injected: task 0 cannot open the rendezvous store")

        dist.TCPStore = refuse
        try:
            import horovod.torch as hvd

            def refuse_init(*_args, **_kwargs):
                raise RuntimeError("injected: task 0 cannot join Horovod's rendezvous")

            hvd.init = refuse_init
        except ImportError:
            pass
    return _model(width)
