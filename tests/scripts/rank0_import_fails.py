"""A model factory module that cannot be imported on task 0 (as when a package is missing on one
node): the config check fails there, before anything else has started (tests/test_slurm_failures.py)."""
from rank0_faults import _model, on_task_zero

if on_task_zero():
    raise ImportError("injected: no module named 'site_package' on task 0's node")


def make(width: int = 4):
    return _model(width)
