"""The single-rank training loop: every zoo model trains, SIGTERM + --resume is bit-exact, and a
damaged checkpoint is skipped for the previous one."""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from lmsdp.launcher.train.checkpoint import CheckpointManager
from lmsdp.launcher.config import load_config
from lmsdp.launcher.train.trainer import run_worker
from lmsdp.runtime.topology import detect_topology

from tests.support import LMSRUN

ZOO_CASES = {
    "resnet18": ["model.kwargs={width: 8, num_classes: 10, stem: cifar}", "data.shape=[3, 16, 16]"],
    "resnet50": ["model.kwargs={width: 4, num_classes: 10, stem: cifar}", "data.shape=[3, 16, 16]"],
    "resnet152": ["model.kwargs={width: 2, num_classes: 10, stem: cifar}", "data.shape=[3, 16, 16]"],
    "gpt": ["model.kwargs={vocab: 64, seq_len: 16, layers: 2, width: 32, heads: 4}"],
    "unet3d": ["model.kwargs={width: 4, levels: 3, classes: 3}", "data.shape=[1, 8, 8, 8]"],
}


def tiny(tmp_path, *overrides: str):
    base = ["train.steps=2", "train.batch_size=2", "train.progress=false", "comm.backend=torch",
            f"train.output_dir={tmp_path}/out", "launch.threads=1"]
    return load_config(None, base + list(overrides))


def read_metrics(path: str):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_zoo_model_trains_two_steps(tmp_path, name):
    config = tiny(tmp_path, f"model.name={name}", *ZOO_CASES[name])
    assert run_worker(config, detect_topology()) == 0
    records = read_metrics(f"{tmp_path}/out/metrics.rank0.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert os.path.exists(f"{tmp_path}/out/summary.json")


def test_zoo_model_trains_with_swap_engine_on(tmp_path):
    config = tiny(tmp_path, "model.name=resnet18", *ZOO_CASES["resnet18"], "swap.enabled=true",
                  "swap.threshold=0", "swap.keep_last=0", "swap.transport=loopback")
    assert run_worker(config, detect_topology()) == 0
    records = read_metrics(f"{tmp_path}/out/metrics.rank0.jsonl")
    assert all(r["swap_out_bytes"] > 0 for r in records)


def test_user_model_and_dataset_factories(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def mlp(hidden=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, hidden), torch.nn.ReLU(),"
        " torch.nn.Linear(hidden, 3))\n"
        "class Squares(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 40\n"
        "    def __getitem__(self, i): return torch.full((12,), float(i % 7)), i % 3\n"
        "def squares(): return Squares()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny(tmp_path, "model.factory=mymodels:mlp", "model.kwargs={hidden: 5}", "data.kind=factory",
                  "data.factory=mymodels:squares", "train.steps=0", "train.epochs=2", "train.batch_size=4")
    assert run_worker(config, detect_topology()) == 0
    records = read_metrics(f"{tmp_path}/out/metrics.rank0.jsonl")
    assert len(records) == 2 * (40 // 4)


def _resume_config(tmp_path, steps: int, every: int = 0) -> str:
    path = tmp_path / "resume.yaml"
    path.write_text(
        "name: resume\n"
        "model: {name: resnet18, kwargs: {width: 8, num_classes: 10, stem: cifar}}\n"
        "data: {shape: [3, 16, 16]}\n"
        "optimizer: {name: adam, lr: 0.01}\n"
        f"train: {{steps: {steps}, batch_size: 8, checkpoint_every: {every}, deterministic: true, log_every: 1}}\n"
        "comm: {backend: torch}\n"
        "launch: {np: 1, threads: 1}\n")
    return str(path)


def _lmsrun(config: str, out: str, *extra: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([LMSRUN, config, "--set", f"train.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _final_model(out: str, step: int):
    state = torch.load(os.path.join(out, "checkpoints", f"step-{step:08d}.pt"), weights_only=True)  # plain data only
    return state["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.integration
def test_sigterm_then_resume_is_bit_exact(tmp_path):
    steps = 30
    config = _resume_config(tmp_path, steps)
    reference = _lmsrun(config, f"{tmp_path}/ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    out = f"{tmp_path}/run"
    proc = _lmsrun(config, out)
    metrics = os.path.join(out, "metrics.rank0.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, err
    saved = CheckpointManager(os.path.join(out, "checkpoints")).candidates()
    assert saved and 3 <= saved[0][0] < steps, (saved, err)

    resumed = _lmsrun(config, out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resumed from" in resumed.stderr.read()
    assert_same_weights(_final_model(out, steps), _final_model(f"{tmp_path}/ref", steps))
    steps_logged = [r["step"] for r in read_metrics(metrics)]
    assert steps_logged == list(range(1, steps + 1))


@pytest.mark.integration
def test_truncated_checkpoint_is_rejected_and_previous_used(tmp_path):
    config = _resume_config(tmp_path, 6, every=2)
    reference = _lmsrun(config, f"{tmp_path}/ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    out = f"{tmp_path}/run"
    first = _lmsrun(config, out, "--set", "train.steps=4")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    newest = os.path.join(out, "checkpoints", "step-00000004.pt")
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)

    resumed = _lmsrun(config, out, "--resume")
    assert resumed.wait(timeout=300) == 0
    err = resumed.stderr.read()
    assert "step-00000004.pt is damaged" in err and "Traceback" not in err
    assert "resumed from" in err and "step-00000002.pt" in err
    assert_same_weights(_final_model(out, 6), _final_model(f"{tmp_path}/ref", 6))


def test_checkpoint_write_is_atomic(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "model": {"w": torch.full((4,), float(step))}})
    assert [s for s, _ in manager.candidates()] == [3, 2]
    assert not glob.glob(str(tmp_path / ".tmp-*"))
    (tmp_path / ".tmp-abc.pt").write_bytes(b"partial")  # a crash mid-write leaves only a temp file
    path, state = manager.load_latest()
    assert state["step"] == 3 and path.endswith("step-00000003.pt")


@pytest.mark.integration
@pytest.mark.mpi
def test_two_ranks_write_one_merged_trace(tmp_path):
    """Swap spans and allreduce spans of both ranks land in one chrome trace, one pid per rank."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [LMSRUN, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.yaml"),
         "-np", "2", "--set", "train.steps=3", "--set", f"train.output_dir={out}", "--set", "comm.backend=torch",
         "--set", f"swap.trace={out}/swap.json", "--set", f"comm.timeline={out}/comm.json",
         "--set", "train.trace_steps=[1,3]",
         "--set", "comm.fusion_threshold=1MiB"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = json.load(open(out / "trace.json"))["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    for pid in (0, 1):
        names = " ".join(e["name"] for e in spans if e["pid"] == pid)
        assert "swap-out" in names and "swap-in" in names and "allreduce" in names, names[:500]
    backward = [e for e in spans if e["pid"] == 0 and e["name"] == "backward"]
    reduce = [e for e in spans if e["pid"] == 0 and "allreduce" in e["name"]]
    # same clock: rank 0's reductions start inside its backward spans (overlap is visible)
    assert any(b["ts"] <= r["ts"] <= b["ts"] + b["dur"] for r in reduce for b in backward)


def test_amp_autocast_with_swap_engine(tmp_path):
    """bfloat16 autocast (CPU here, CUDA on a GPU) with everything swapped: the loop trains, loss finite."""
    config = tiny(tmp_path, "model.name=gpt", *ZOO_CASES["gpt"], "train.amp=true", "train.amp_dtype=bfloat16",
                  "swap.enabled=true", "swap.threshold=0", "swap.keep_last=0", "swap.transport=loopback")
    assert run_worker(config, detect_topology()) == 0
    records = read_metrics(f"{tmp_path}/out/metrics.rank0.jsonl")
    assert all(math.isfinite(r["loss"]) and r["swap_out_bytes"] > 0 for r in records)
