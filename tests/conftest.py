"""Shared pytest set-up. Markers (also in pyproject.toml): ``integration`` marks every test that
starts processes (mpirun, lmsrun, Slurm daemons, subprocess CLIs), so ``pytest -m "not integration"``
is the fast tier for development; ``make test`` runs everything. Shared paths and the ``Run``
helper live in ``tests/support.py``."""
import os
import sys

import pytest

# tests import their helpers as ``tests.support``: the repository root must be importable
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support import ENV, LMSRUN, REPO, SCRIPTS, TINY  # noqa: E402


@pytest.fixture
def lmsrun_env() -> dict:
    """The environment for a child ``lmsrun``: PYTHONPATH reaches tests/scripts (model factories)."""
    return dict(ENV)


@pytest.fixture
def tiny_config() -> str:
    return TINY


__all__ = ["ENV", "LMSRUN", "REPO", "SCRIPTS", "TINY"]
