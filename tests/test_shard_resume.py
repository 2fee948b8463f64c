"""Resuming across world sizes and strategies, and float16 loss scaling under shard, with real
``lmsrun`` jobs (mpirun, gloo on CPU).

The data comes from ``tests/scripts/token_data.py`` through ``data.factory``: step s of R ranks x
batch B reads samples [s*R*B, (s+1)*R*B) of the epoch's order, so runs with the same R x B see the
same global batches and an interrupted run resumed at another world size must reproduce the
uninterrupted run's losses: model and optimizer (Adam) state both carried over."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from lmsdp.launcher.train.checkpoint_sharded import optim_by_index, optim_by_name
from lmsdp.launcher.models import build_model

from .test_shard import GPT, LMSRUN, _env, config_file, export, metrics

SCRIPTS = Path(__file__).parent / "scripts"
TOKENS = ["data.kind=factory", "data.factory=token_data:tokens"]
GLOBAL_BATCH = 8


def run(out: Path, strategy: str, np: int, steps: int, *extra: str, batch: int = 0) -> Tuple[Path, str]:
    """One job of ``np`` ranks whose global batch is GLOBAL_BATCH (unless ``batch`` says otherwise);
    returns (output folder, stderr)."""
    argv = [LMSRUN, config_file(out.parent), "-np", str(np), "--threads", "1", "--output-dir", str(out)]
    sets = [f"train.batch_size={batch or GLOBAL_BATCH // np}", f"train.steps={steps}", "train.progress=false",
            "train.deterministic=true", "comm.backend=torch", f"comm.strategy={strategy}", *GPT, *TOKENS]
    argv += [a for item in sets for a in ("--set", item)] + list(extra)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return out, proc.stderr


def losses(out: Path) -> List[float]:
    return [r["loss"] for r in metrics(out)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The uninterrupted 8-step shard run, and the first 4 steps of it (2 ranks) and of replicate (1 rank)."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    root = tmp_path_factory.mktemp("resume")
    return {"reference": run(root / "reference", "shard", 2, 8)[0],
            "shard-2": run(root / "shard-2", "shard", 2, 4)[0],
            "replicate-1": run(root / "replicate-1", "replicate", 1, 4)[0]}


def resumed(jobs: Dict[str, Path], start: str, tmp_path: Path, strategy: str, np: int, batch: int = 0,
            steps: int = 8) -> Tuple[Path, str]:
    out = tmp_path / "run"
    shutil.copytree(jobs[start], out)
    return run(out, strategy, np, steps, "--resume", batch=batch)


def assert_continues_the_reference(out: Path, reference: Path) -> None:
    """Steps 5..8 after the resume are the uninterrupted run's (up to the order of float sums), and so
    are the final weights."""
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    for step, (a, b) in enumerate(zip(losses(out), losses(reference)), 1):
        assert abs(a - b) <= 1e-5, (step, a, b)
    final, expected = export(out), export(reference)
    assert final.keys() == expected.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-4, atol=1e-4)  # Adam: lr 0.01 a step


# ------------------------------------------------------------------- world size and strategy
@pytest.mark.integration
@pytest.mark.mpi
def test_shard_checkpoint_of_2_ranks_resumes_under_shard_on_4(jobs, tmp_path):
    """DCP reshards: each of 4 ranks loads its quarter of model and Adam state from 2 ranks' files."""
    out, err = resumed(jobs, "shard-2", tmp_path, "shard", 4)
    assert "checkpoint of 2 rank(s) resumed on 4: the global batch stays 8 samples" in err
    assert "step-00000004 at step 4/8" in err and "warning" not in err
    assert_continues_the_reference(out, jobs["reference"])


@pytest.mark.integration
@pytest.mark.mpi
def test_shard_checkpoint_resumes_under_replicate_on_1_rank(jobs, tmp_path):
    """Shard needs 2 ranks on CPU, so world size 1 is replicate: the folder is consolidated in-process."""
    out, err = resumed(jobs, "shard-2", tmp_path, "replicate", 1)
    assert "checkpoint of comm.strategy shard loaded into replicate" in err
    assert "checkpoint of 2 rank(s) resumed on 1" in err and "step-00000004 at step 4/8" in err
    assert_continues_the_reference(out, jobs["reference"])


@pytest.mark.integration
@pytest.mark.mpi
def test_replicate_checkpoint_of_1_rank_resumes_under_shard_on_2(jobs, tmp_path):
    out, err = resumed(jobs, "replicate-1", tmp_path, "shard", 2)
    assert "checkpoint of comm.strategy replicate loaded into shard" in err
    assert "checkpoint of 1 rank(s) resumed on 2" in err and "step-00000004.pt at step 4/8" in err
    assert_continues_the_reference(out, jobs["reference"])


@pytest.mark.integration
@pytest.mark.mpi
def test_a_changed_global_batch_is_one_warning_line(jobs, tmp_path):
    out, err = resumed(jobs, "shard-2", tmp_path, "replicate", 1, batch=4, steps=5)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["[lmsdp] warning: checkpoint of 2 rank(s) resumed on 1: the global batch changes from 8 to "
                        "4 samples, so the batches after step 4 are not the ones an uninterrupted run would see "
                        "(model and optimizer state carry over)"]
    assert [r["step"] for r in metrics(out)] == list(range(1, 6))


def test_optimizer_state_moves_between_index_and_name_layouts():
    """A replicate checkpoint's optimizer state (by index) to the sharded layout (by name) and back
    is the identity, for every parameter and Adam slot."""
    torch.manual_seed(0)
    model = build_model("gpt", vocab=64, seq_len=16, layers=2, width=32, heads=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    by_name = optim_by_name(state, optimizer, model)
    assert set(by_name["state"]) == {name for name, _ in model.named_parameters()}
    back = optim_by_index(by_name, optimizer, model)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()
    for index, slots in state["state"].items():
        for key, value in slots.items():
            assert torch.equal(back["state"][index][key], value)
    other = {**by_name, "state": {**by_name["state"], "head.extra": by_name["state"]["ln_f.weight"]}}
    with pytest.raises(ValueError, match="head.extra"):
        optim_by_index(other, optimizer, model)


# ------------------------------------------------------------------------ float16 under shard
@pytest.mark.integration
@pytest.mark.mpi
def test_fp16_loss_scaling_under_shard_agrees_across_ranks_without_warnings(tmp_path):
    """The strategy's scaler unscales the gradient shards exactly, steps on finite gradients, and an
    inf in rank 1's shard alone makes both ranks skip and halve the scale; no DTensor warning."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    result = tmp_path / "probe.json"
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable,
                           str(SCRIPTS / "shard_scaler_probe.py"), str(result)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in json.loads(result.read_text()):
        assert rank["unscaled_equal_reference"] and rank["finite_step_moved"], rank
        assert rank["scale_after_finite"] == 2.0 ** 16
        assert not rank["inf_step_moved"] and rank["scale_after_inf"] == 2.0 ** 15, rank
        assert rank["warnings"] == []


@pytest.mark.integration
@pytest.mark.mpi
def test_fp16_amp_under_shard_trains_like_replicate(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    amp = ("--set", "train.amp=true", "--set", "train.amp_dtype=float16", "--set", "train.clip_grad_norm=0.2")
    shard, err = run(tmp_path / "shard", "shard", 2, 6, *amp)
    replicate, _ = run(tmp_path / "replicate", "replicate", 2, 6, *amp)
    assert "Warning" not in err, err[-2000:]  # the DTensor warning torch's ShardedGradScaler gave each step
    for a, b in zip(metrics(shard), metrics(replicate)):
        assert math.isfinite(a["loss"]) and a["loss_scale"] == b["loss_scale"] == 2.0 ** 16
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    assert len({r["loss"] for r in metrics(shard)}) == 6  # the steps were taken, not skipped
