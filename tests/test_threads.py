"""launch.threads: auto: per-module thread counts applied in forward and backward, the keep-only-
where-it-helps rule, and a real run that trains bit-exactly like the uniform rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import pytest
import torch
from torch import nn

from lmsdp.launcher.train.threads import ModuleThreads, candidate_counts, choose_count

LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")


class _Record(torch.autograd.Function):
    """Identity that notes the intra-op thread count its forward and its backward ran with."""

    @staticmethod
    def forward(ctx, x, log):  # type: ignore[override]
        ctx.log = log
        log.append(("fwd", torch.get_num_threads()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.log.append(("bwd", torch.get_num_threads()))
        return grad, None


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log: List[tuple] = []

    def forward(self, x):
        return _Record.apply(x, self.log)


def _net():
    return nn.Sequential(nn.Linear(4, 4), Probe(), nn.Linear(4, 4), Probe())


def _step(net):
    net(torch.randn(3, 4)).sum().backward()


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_plan_sets_counts_in_forward_and_backward(threads_restored):
    net = _net()
    ctl = ModuleThreads(net, base=4, candidates=[1, 2, 4])
    ctl.apply_plan({"1": {"fwd": 1, "bwd": 2}, "3": {"fwd": 2, "bwd": 1}})
    torch.set_num_threads(4)
    _step(net)
    assert net[1].log == [("fwd", 1), ("bwd", 2)]
    assert net[3].log == [("fwd", 2), ("bwd", 1)]
    assert torch.get_num_threads() == 4  # back to the uniform count after backward
    ctl.close()


def test_measuring_steps_run_every_module_at_the_step_count(threads_restored):
    net = _net()
    ctl = ModuleThreads(net, base=4, candidates=[1, 4], rounds=2, warmup=1)
    torch.set_num_threads(4)
    for _ in range(len(ctl.schedule) + 1):
        _step(net)
    seen = [count for _, count in net[1].log]
    assert seen == [4, 4, 1, 1, 4, 4, 4, 4, 1, 1] + seen[10:]  # warm-up, then 1, 4, 4, 1 (interleaved)
    assert ctl.decided and set(ctl.plans["0"].times["fwd"]) == {1, 4}
    assert set(ctl.plans["0"].times["bwd"]) == {1, 4}
    ctl.close()


def test_unchanged_modules_lose_their_hooks(threads_restored):
    net = _net()
    ctl = ModuleThreads(net, base=4, candidates=[1, 4])
    ctl.apply_plan({"1": {"fwd": 1, "bwd": 4}})
    assert set(ctl._unit_handles) == {"1"}
    assert "1/4 modules off uniform 4: 1x Probe fwd 1/bwd 4" in ctl.summary()["threads_auto"]
    ctl.close()


def test_choose_keeps_a_count_only_where_it_measurably_helps():
    assert choose_count({1: 0.5e-3, 2: 1.0e-3}, base=2, margin=0.1, min_gain_s=20e-6) == 1
    assert choose_count({1: 0.95e-3, 2: 1.0e-3}, base=2, margin=0.1, min_gain_s=20e-6) == 2  # < 10 %
    assert choose_count({1: 5e-6, 2: 20e-6}, base=2, margin=0.1, min_gain_s=20e-6) == 2  # < 20 us
    assert choose_count({1: float("nan"), 2: 1e-3}, base=2, margin=0.1, min_gain_s=20e-6) == 2
    assert candidate_counts(8) == [1, 4, 8] and candidate_counts(1) == [1]


MLP = """
import torch
def mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
"""


@pytest.mark.integration
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: auto has nothing to choose")
def test_auto_trains_bit_exactly_like_the_uniform_rule(tmp_path):
    """An MLP: its GEMMs run under MKL's strict reproducibility mode (MKL_CBWR=AUTO,STRICT: the same
    bits at any thread count), and its other ops are too small for ATen to split across threads.
    Conv / LayerNorm / Embedding backward reductions on CPU split by thread count, so the zoo's
    ResNet and GPT differ in the last bits between any two thread counts, uniform or not."""
    (tmp_path / "tinymlp.py").write_text(MLP)
    (tmp_path / "mlp.yaml").write_text("name: mlp\n")
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "PYTHONPATH": str(tmp_path)}
    weights = {}
    for threads in ("0", "auto"):
        out = tmp_path / f"run-{threads}"
        proc = subprocess.run(
            [LMSRUN, "mlp.yaml", "--set", "model.factory=tinymlp:mlp", "--set", "data.shape=[3, 4, 4]", "--set", "data.classes=10",
             "--set", "train.steps=9", "--set", "train.batch_size=32", "--set", "train.deterministic=true",
             "--set", "train.progress=false", "--set", "comm.backend=torch", "--set", f"launch.threads={threads}",
             "--output-dir", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        state = torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
        weights[threads] = state["model"]
    summary = json.loads((tmp_path / "run-auto" / "summary.json").read_text())
    assert "threads_auto" in summary  # the plan is reported (which modules moved depends on timing)
    plan = json.loads((tmp_path / "run-auto" / "threads_plan.json").read_text())
    assert plan["decided"] and {m["name"] for m in plan["modules"]} >= {"1", "3", "5"}
    assert all(torch.equal(weights["0"][k], weights["auto"][k]) for k in weights["0"])
