"""`lmsrun plan` and `lmsrun tune` on a user's own code: ``model.factory`` and ``data.kind: factory`` from a
package on PYTHONPATH (written here, imported by real lmsrun processes), including models the planner's
fake-tensor profile cannot run (a forward that reads ``.item()`` / ``.tolist()``)."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import yaml

from tests.support import LMSRUN

pytestmark = pytest.mark.integration

MODELS = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, width=32, classes=4, inputs=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


class ReadsItem(MLP):
    def forward(self, x):
        h = self.net[1](self.net[0](x))
        if h.mean().item() > 1e9:  # data-dependent control flow
            h = h * 0
        return self.net[2](h)


class ReadsList(MLP):
    def forward(self, x):
        scale = x.abs().amax(dim=1).tolist()
        return self.net(x) * (1.0 + 0.0 * torch.tensor(scale).unsqueeze(1))


def mlp(**kwargs):
    return MLP(**kwargs)


def reads_item(**kwargs):
    return ReadsItem(**kwargs)


def reads_list(**kwargs):
    return ReadsList(**kwargs)
'''

DATA = '''
import torch
from torch.utils.data import Dataset


class Points(Dataset):
    """Real tensors made when the factory runs; indexed with Python ints."""

    def __init__(self, n, inputs=16, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, inputs, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def points(n=64):
    return Points(n)
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A folder with ``userpkg`` (models, data) and a config using both; the env puts it on PYTHONPATH."""
    root = tmp_path_factory.mktemp("userpkg")
    pkg = root / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(MODELS))
    (pkg / "data.py").write_text(textwrap.dedent(DATA))
    config = {"name": "user", "model": {"factory": "userpkg.models:mlp", "kwargs": {"width": 32}},
              "data": {"kind": "factory", "factory": "userpkg.data:points", "kwargs": {"n": 64}, "task": "classify"},
              "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"steps": 4, "batch_size": 8, "progress": False},
              "swap": {"enabled": True, "threshold": "1KiB", "memory_target": "64MiB"},
              "comm": {"backend": "torch"}, "launch": {"np": 2}}
    (root / "user.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return root, env


def lmsrun(user, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    root, env = user
    return subprocess.run([LMSRUN, *argv], capture_output=True, text=True, timeout=timeout, cwd=root, env=env)


def test_plan_profiles_a_factory_model_on_factory_data_past_the_datasets_length(user):
    plain = lmsrun(user, "plan", "user.yaml")
    assert plain.returncode == 0, plain.stderr
    assert "largest batch that fits:" in plain.stdout and "chosen:" in plain.stdout
    most = lmsrun(user, "plan", "user.yaml", "--batch", "max")  # searches batches far above 64 samples
    assert most.returncode == 0, most.stderr
    assert int(most.stdout.split("# user: batch ", 1)[1].split(",")[0]) > 64, most.stdout


@pytest.mark.parametrize("factory", ["userpkg.models:reads_item", "userpkg.models:reads_list"])
def test_plan_names_the_model_fake_tensors_cannot_run_in_one_line(user, factory):
    proc = lmsrun(user, "plan", "user.yaml", "--set", f"model.factory={factory}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lmsrun: error: model.factory: {factory} cannot run on the planner's fake tensors: "
                               "its step reads a tensor's value (.item(), .tolist()"), lines[0]


def test_swap_plan_auto_on_such_a_model_is_the_same_one_line(user, tmp_path):
    proc = lmsrun(user, "user.yaml", "-np", "1", "--set", "model.factory=userpkg.models:reads_item",
                  "--set", "swap.plan=auto", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmsrun: error:")]
    assert errors and "cannot run on the planner's fake tensors" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.mpi
def test_tune_falls_back_to_four_times_the_batch_and_its_config_runs(user, tmp_path):
    out, report = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    proc = lmsrun(user, "tune", "user.yaml", "--set", "model.factory=userpkg.models:reads_item",
                  "--time-budget", "30s", "--trial-steps", "3", "--warmup", "1", "--write", str(out),
                  "--json", str(report), timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    why = proc.stdout.split("why:\n", 1)[1]
    batch_line = next(line for line in why.splitlines() if line.strip().startswith("train.batch_size = "))
    assert ("ceiling 32 from 4 x the config's batch: planner: model.factory: userpkg.models:reads_item cannot run "
            "on the planner's fake tensors") in batch_line, batch_line
    assert any(t["samples_per_s"] for t in json.loads(report.read_text())["trials"])
    run = lmsrun(user, str(out), "--set", "train.steps=2", "--output-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_run"] == 2
