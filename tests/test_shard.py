"""comm.strategy: shard (torch FSDP2) with real ranks: ``lmsrun -np 2`` (mpirun, gloo on CPU).

Each run is a real 2-rank job; runs shared by several tests are made once per module. Shown:
shard trains the same losses as replicate (GPT with gradient clipping, ResNet with BatchNorm), each
rank holds about half the parameter + gradient + optimizer bytes, the swap engine swaps exactly the
activation bytes it swaps under replicate (never FSDP's gathered parameters) and changes no bit,
SIGTERM + --resume is bit-exact, ``lmsrun export`` consolidates, and bad combinations are one line,
exit 2."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from lmsdp.comm.registry import STRATEGIES
from lmsdp.comm.shard import detect_blocks, named_blocks
from lmsdp.launcher.models import build_model
from lmsdp.runtime.errors import UserError

LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")

GPT = ["model.name=gpt", "model.kwargs={vocab: 64, seq_len: 16, layers: 2, width: 32, heads: 4}",
       "optimizer.name=adam", "optimizer.lr=0.01", "train.clip_grad_norm=0.2"]
RESNET = ["model.name=resnet18", "model.kwargs={width: 4, num_classes: 10, stem: cifar}", "data.shape=[3, 8, 8]",
          "optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.05"]
SWAP = ["swap.enabled=true", "swap.threshold=0", "swap.keep_last=0", "swap.prefetch=2", "swap.transport=loopback"]
SHARD = ["comm.strategy=shard"]


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def config_file(folder: Path) -> str:
    """A minimal job file; tests say everything else with --set."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text("name: shardtest\n")
    return str(path)


def lmsrun(out: Path, *overrides: str, np: int = 2, steps: int = 10, extra: tuple = (), wait: bool = True):
    argv = [LMSRUN, config_file(out.parent), "-np", str(np), "--threads", "1", "--output-dir", str(out)]
    base = ["train.batch_size=4", f"train.steps={steps}", "train.progress=false", "train.deterministic=true",
            "comm.backend=torch"]
    for item in base + list(overrides):
        argv += ["--set", item]
    proc = subprocess.Popen(argv + list(extra), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    return out


def metrics(out: Path, rank: int = 0) -> List[dict]:
    return [json.loads(line) for line in (out / f"metrics.rank{rank}.jsonl").read_text().splitlines()]


def export(out: Path) -> Dict[str, torch.Tensor]:
    proc = subprocess.run([LMSRUN, "export", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out / "model.pt", weights_only=True)


def assert_equal_states(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The shared 2-rank runs (each a real mpirun job of 10 steps)."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    root = tmp_path_factory.mktemp("shard")
    trace = [f"swap.trace={root}/gpt-shard-swap/swap.json", f"comm.timeline={root}/gpt-shard-swap/comm.json",
             "train.trace_steps=[2,9]"]
    plans = {
        "gpt-replicate": GPT, "gpt-shard": GPT + SHARD + ["train.checkpoint_every=2"],
        "gpt-replicate-swap": GPT + SWAP, "gpt-shard-swap": GPT + SHARD + SWAP + trace,
        "resnet-replicate": RESNET, "resnet-shard": RESNET + SHARD,
    }
    return {name: lmsrun(root / name, *overrides) for name, overrides in plans.items()}


# ---------------------------------------------------------------------------------- real ranks
@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.parametrize("model", ["gpt", "resnet"])
def test_shard_trains_the_same_losses_as_replicate(runs, model):
    rep, shard = metrics(runs[f"{model}-replicate"]), metrics(runs[f"{model}-shard"])
    assert [r["step"] for r in shard] == list(range(1, 11))
    for a, b in zip(rep, shard):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        if "grad_norm" in a:  # gpt runs clip: the norm of the reduced gradients is the same too
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]
    if model == "gpt":
        assert all(r["grad_norm"] > 0.2 for r in rep[:3])  # the clip really cut (it changes the losses)
    assert shard[-1]["allgather_bytes"] > 0 and shard[-1]["reduce_scatter_bytes"] > 0
    assert shard[-1]["allreduce_bytes"] == 0  # the backend does not also allreduce the gradients


@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.parametrize("model", ["gpt", "resnet"])
def test_each_rank_holds_half_the_params_grads_and_optimizer_state(runs, model):
    rep = metrics(runs[f"{model}-replicate"])[-1]
    ranks = [metrics(runs[f"{model}-shard"], r)[-1] for r in (0, 1)]
    for key in ("param_bytes", "grad_bytes", "optim_bytes"):
        # the two shards hold the whole (up to padding and Adam's per-parameter step scalars)
        assert abs(sum(r[key] for r in ranks) - rep[key]) <= 0.02 * rep[key], key
        for r in ranks:
            assert 0.4 <= r[key] / rep[key] <= 0.6, (key, r[key], rep[key])


@pytest.mark.integration
@pytest.mark.mpi
def test_swap_engine_under_shard_is_bit_exact_and_swaps_only_activations(runs):
    plain, swapped = metrics(runs["gpt-shard"]), metrics(runs["gpt-shard-swap"])
    assert [r["loss"] for r in plain] == [r["loss"] for r in swapped]
    assert_equal_states(export(runs["gpt-shard"]), export(runs["gpt-shard-swap"]))
    # FSDP's gathered parameters are never swapped: under shard the engine moves exactly the bytes
    # it moves under replicate, where every weight is a resident parameter.
    replicate = metrics(runs["gpt-replicate-swap"])
    for rank in (0, 1):
        for a, b in zip(replicate, metrics(runs["gpt-shard-swap"], rank)):
            assert b["swap_out_bytes"] > 0 and a["swap_out_bytes"] == b["swap_out_bytes"]


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
def test_engine_never_swaps_fsdp_gathered_parameters(tmp_path):
    """Storage by storage: FSDP's gathered parameters reach the engine's pack hook (saved by linear,
    layer norm, embedding) but none is ever swapped out, on either rank."""
    result = tmp_path / "probe.json"
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable,
                           str(Path(__file__).parent / "scripts" / "shard_swap_probe.py"), str(result)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in json.loads(result.read_text()):
        assert rank["gathered"] == 36  # every parameter of the 2-block GPT (q, k, v apart), gathered once per step
        assert rank["seen"] > 0 and rank["swapped"] > 0  # the check is not vacuous
        assert rank["swapped_fsdp"] == 0


@pytest.mark.integration
@pytest.mark.mpi
def test_merged_trace_has_swap_allgather_and_reduce_scatter_of_both_ranks(runs):
    events = json.loads((runs["gpt-shard-swap"] / "trace.json").read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    for pid in (0, 1):
        names = {e["name"] for e in spans if e["pid"] == pid}
        assert {"allgather", "reduce-scatter"} <= names, names
        assert any(n.startswith("swap-out") for n in names) and any(n.startswith("swap-in") for n in names)


@pytest.mark.integration
@pytest.mark.mpi
def test_export_consolidates_a_sharded_checkpoint(runs):
    state = export(runs["gpt-shard"])
    model = build_model("gpt", vocab=64, seq_len=16, layers=2, width=32, heads=4)
    model.load_state_dict(state)  # every key, full shapes
    replicate = export(runs["gpt-replicate"])  # same training, same weights (up to Adam amplifying the
    assert state.keys() == replicate.keys()    # order of the sums in the clipped norm, shard by shard)
    for key in state:
        torch.testing.assert_close(state[key], replicate[key], rtol=1e-4, atol=1e-4)
    saved = sorted(p.name for p in (runs["gpt-shard"] / "checkpoints").iterdir())
    assert saved == ["step-00000006", "step-00000008", "step-00000010"]  # keep_checkpoints: 3, no temp left
    assert sorted(p.name for p in (runs["gpt-shard"] / "checkpoints" / "step-00000010").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp", "lmsdp.pt"]


@pytest.mark.integration
@pytest.mark.mpi
def test_damaged_sharded_checkpoint_is_skipped_for_the_previous_one(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["gpt-shard"], out)
    shard = out / "checkpoints" / "step-00000010" / "__1_0.distcp"  # rank 1's part only
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    proc = lmsrun(out, *GPT, *SHARD, "train.checkpoint_every=2", extra=("--resume",), wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "step-00000010 is damaged" in err and "Traceback" not in err
    assert "resumed from" in err and "step-00000008 at step 8" in err
    assert_equal_states(export(out), export(runs["gpt-shard"]))  # steps 9, 10 again: the same weights


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
def test_sigterm_then_resume_under_shard_is_bit_exact(tmp_path):
    steps = 80
    reference = lmsrun(tmp_path / "ref", *GPT, *SHARD, steps=steps)
    out = tmp_path / "run"
    proc = lmsrun(out, *GPT, *SHARD, steps=steps, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.rank0.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = sorted((out / "checkpoints").iterdir())
    assert len(stopped) == 1 and 5 <= int(stopped[0].name.split("-")[1]) < steps, (stopped, err[-2000:])

    resumed = lmsrun(out, *GPT, *SHARD, steps=steps, extra=("--resume",), wait=False)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in err, err[-3000:]
    assert_equal_states(export(out), export(reference))
    assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1))


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
def test_shard_composes_with_bf16_autocast_and_swap(tmp_path):
    """bf16 autocast, bf16 all-gather (param_dtype), fp32 reduce-scatter, swap engine, clipping:
    trains; offload on CPU is a no-op that says so once."""
    proc = lmsrun(tmp_path / "amp", *GPT, *SHARD, *SWAP, "train.amp=true", "train.amp_dtype=bfloat16",
                  "comm.mixed_precision.param_dtype=bfloat16", "comm.mixed_precision.reduce_dtype=float32",
                  "comm.offload=optimizer_and_params", steps=3, wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = metrics(tmp_path / "amp")
    assert all(math.isfinite(r["loss"]) and r["swap_out_bytes"] > 0 and r["allgather_bytes"] > 0 for r in records)
    assert err.count("comm.offload: optimizer_and_params is a no-op on CPU") == 1


# ------------------------------------------------------------------ bad combinations: exit 2
def _error(tmp_path: Path, *overrides: str, np: int = 2) -> str:
    proc = subprocess.run([LMSRUN, config_file(tmp_path), "-np", str(np), "--dry-run", "--output-dir", str(tmp_path),
                           *[a for o in ("comm.backend=torch", *overrides) for a in ("--set", o)]],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmsrun: error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.integration
def test_shard_with_one_rank_is_a_config_error(tmp_path):
    line = _error(tmp_path, *GPT, *SHARD, np=1)
    assert "comm.strategy: shard needs 2 or more ranks" in line and "replicate" in line


@pytest.mark.integration
def test_shard_modules_that_match_nothing_is_a_config_error(tmp_path):
    line = _error(tmp_path, *GPT, *SHARD, "comm.shard_modules=[Blok]")
    assert "comm.shard_modules: no module of class 'Blok'" in line and "did you mean 'Block'" in line


@pytest.mark.integration
def test_shard_with_horovod_names_the_alternative(tmp_path):
    line = _error(tmp_path, *GPT, *SHARD, "comm.backend=horovod")
    assert "comm.backend: horovod has no sharding" in line and "torch" in line


@pytest.mark.integration
@pytest.mark.parametrize("override,words", [("comm.compression=fp16", "comm.mixed_precision.reduce_dtype"),
                                             ("comm.op=sum", "FSDP averages")])
def test_replicate_only_comm_options_are_refused_under_shard(tmp_path, override, words):
    assert words in _error(tmp_path, *GPT, *SHARD, override)


@pytest.mark.integration
def test_unknown_strategy_lists_the_registered_ones(tmp_path):
    line = _error(tmp_path, "comm.strategy=shrad")
    assert "did you mean 'shard'" in line and "replicate, shard" in line


# --------------------------------------------------------------------------- in-process units
@pytest.mark.integration
def test_export_of_a_replicated_checkpoint_and_of_nothing(tmp_path):
    from lmsdp.launcher.train.checkpoint import CheckpointManager

    run = tmp_path / "run"
    CheckpointManager(str(run / "checkpoints")).save(4, {"step": 4, "model": {"w": torch.arange(3.0)}})
    proc = subprocess.run([LMSRUN, "export", str(run), "-o", str(tmp_path / "m.pt")], capture_output=True, text=True)
    assert proc.returncode == 0 and "step-00000004.pt" in proc.stderr, proc.stderr
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.arange(3.0))
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([LMSRUN, "export", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("lmsrun: error: RUN_DIR: no checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_strategy_choices_come_from_the_registry():
    from lmsdp.comm.config import CommConfig
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(CommConfig)}["strategy"]
    assert tuple(field.metadata["choices"]) == STRATEGIES.names() == ("replicate", "shard")


def test_auto_backend_picks_torch_for_shard():
    from lmsdp.comm.registry import BACKENDS
    from lmsdp.runtime.topology import Topology

    assert BACKENDS.resolve("auto", Topology(), "shard").name == "torch"


@pytest.mark.parametrize("name,expected", [
    ("gpt", {"Block"}), ("resnet18", {"BasicBlock"}), ("resnet50", {"Bottleneck"}),
    ("unet3d", {"Sequential", "ConvTranspose3d"}),
])
def test_blocks_are_detected_for_the_zoo(name, expected):
    with torch.device("meta"):
        model = build_model(name)
    blocks = detect_blocks(model)
    assert {type(b).__name__ for b in blocks} == expected
    if name == "unet3d":  # every level: the down path, the up-convolutions and the merges
        assert len(blocks) == 3 + 2 + 2


def test_named_blocks_take_the_outermost_match_and_reject_unknown_names():
    with torch.device("meta"):
        model = build_model("gpt", layers=3)
    assert len(named_blocks(model, ["Block"])) == 3
    assert len(named_blocks(model, ["Linear"])) == 3 * 4 + 1
    with pytest.raises(UserError, match="did you mean 'Block'"):
        named_blocks(model, ["block"])
