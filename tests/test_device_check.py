"""scripts/device_check.sh, the one-call GPU checks for a lent device machine: on this CPU machine it
refuses the GPU phases in one line, and an unknown phase is one line naming the allowed ones."""
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO

SCRIPT = os.path.join(REPO, "scripts", "device_check.sh")


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, env=env)


def test_an_unknown_phase_is_one_line(tmp_path):
    proc = _run("gpus", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["device_check: error: phase: expected one of: gpu plan-shard tune all; "
                                        "got 'gpus'"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("phase", ["gpu", "plan-shard"])
def test_gpu_phases_refuse_without_cuda(tmp_path, phase):
    proc = _run(phase, tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"device_check: error: {phase}: no CUDA device here "
                                        "(torch.cuda.is_available() is False); run it on the lent GPU machine"]
