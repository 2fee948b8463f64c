"""The disk tier below host memory (``swap.disk_dir``): with a host limit too small for anything, every
swapped tensor goes to disk and training is bit-exact against no swapping (zoo models and two Hugging
Face models, tiny); a corrupted spill file is named with ``swap.verify``; a cut-short one always; the
disk limit and a full disk (a real small tmpfs) are one line; a rank killed with SIGKILL mid-step leaves
its spill folder, which the next start in that folder removes."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmsdp.launcher.models import build_model
from lmsdp.swapping import SwapConfig, SwapEngine
from lmsdp.swapping.disk import DiskTierError
from lmsdp.swapping.plan_models import DiskModel, Settings, predict
from tests.support import ENV, LMSRUN, REPO, TINY
from tests.test_swap_exactness import assert_same, train

pytestmark = pytest.mark.filterwarnings("ignore:lmsdp swap")

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 16, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BERT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 64, "max_position_embeddings": 16, "num_labels": 4, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def _ce(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.arange(x.shape[0]) % 4)


def _lm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), x.flatten())


def _hf(name: str, kwargs: Dict[str, Any], config: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, name)(getattr(transformers, config)(**kwargs))
    return build


Case = Tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], Callable[[nn.Module, torch.Tensor], torch.Tensor]]
CASES: Dict[str, Case] = {
    "resnet18": (lambda: build_model("resnet18", width=4, num_classes=4), lambda: torch.randn(2, 3, 16, 16), _ce),
    "gpt": (lambda: build_model("gpt", vocab=64, seq_len=16, layers=2, width=32, heads=4),
            lambda: torch.randint(0, 64, (2, 16)), _lm),
    "unet3d": (lambda: build_model("unet3d", width=4, levels=3, classes=3), lambda: torch.randn(1, 1, 8, 8, 8),
               lambda m, x: F.cross_entropy(m(x), torch.zeros(1, 8, 8, 8, dtype=torch.long))),
    "hf-gpt2": (_hf("GPT2LMHeadModel", GPT2, "GPT2Config"), lambda: torch.randint(0, 64, (2, 16)),
                lambda m, x: m(x, labels=x).loss),
    "hf-bert": (_hf("BertForSequenceClassification", BERT, "BertConfig"), lambda: torch.randint(0, 64, (2, 16)),
                lambda m, x: F.cross_entropy(m(x).logits, torch.tensor([1, 3]))),
}


def spill_all(disk_dir: str, **extra: Any) -> SwapEngine:
    """Everything swapped, nothing fits in host memory: every tensor goes to the disk tier."""
    return SwapEngine(SwapConfig(enabled=True, threshold=0, prefetch=2, keep_last=0, budget=0, transport="loopback",
                                 host_limit=1, disk_dir=disk_dir, **extra), "cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_everything_spilled_to_disk_is_bit_exact(tmp_path, case: str) -> None:
    if case.startswith("hf-") and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not importable here (scripts/setup.sh installs it)")
    build, make_input, loss_fn = CASES[case]
    ref = train(build, make_input, loss_fn, None)
    engine = spill_all(str(tmp_path), verify=True)
    folder = engine.mover.store.disk.folder
    try:
        got = train(build, make_input, loss_fn, engine)
        s = engine.summary()
        assert engine.live_handles == 0
    finally:
        engine.close()
    assert_same(ref, got)
    assert s["host_tier_bytes"] == 0 and s["disk_write_bytes"] == s["swap_out_bytes"] > 0
    assert s["disk_read_bytes"] == s["swap_in_bytes"] and s["disk_write_gbps"] > 0 and s["disk_peak_bytes"] > 0
    assert s["disk_staging_bytes"] > 0
    assert not os.path.exists(folder) and os.listdir(tmp_path) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda transport's pinned staging)")
def test_everything_spilled_from_a_gpu_is_bit_exact(tmp_path) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    build, make_input, loss_fn = CASES["gpt"]
    ref = train(build, make_input, loss_fn, None, device="cuda")
    engine = SwapEngine(SwapConfig(enabled=True, threshold=0, prefetch=2, keep_last=0, budget=0, transport="cuda",
                                   host_limit=1, disk_dir=str(tmp_path), verify=True), "cuda")
    try:
        got = train(build, make_input, loss_fn, engine, device="cuda")
        assert engine.summary()["disk_read_bytes"] > 0
    finally:
        engine.close()
        torch.use_deterministic_algorithms(False)
    assert_same(ref, got)
    assert os.listdir(tmp_path) == []


def test_the_policy_picks_the_tier(tmp_path) -> None:
    """A policy may send tensors to disk while host memory has room (here every other one)."""
    from lmsdp.swapping.policy import ThresholdPolicy

    class EveryOtherToDisk(ThresholdPolicy):
        def tier(self, h: Any) -> str:
            return "disk" if h.seq % 2 else "host"

    build, make_input, loss_fn = CASES["gpt"]
    ref = train(build, make_input, loss_fn, None)
    engine = SwapEngine(SwapConfig(enabled=True, transport="loopback", disk_dir=str(tmp_path)), "cpu",
                        policy=EveryOtherToDisk(0, 2, 0, 0))
    try:
        got = train(build, make_input, loss_fn, engine)
        s = engine.summary()
    finally:
        engine.close()
    assert_same(ref, got)
    assert s["host_tier_bytes"] > 0 and s["disk_write_bytes"] > 0
    assert s["host_tier_bytes"] + s["disk_write_bytes"] == s["swap_out_bytes"]


def test_a_job_reports_per_tier_figures(tmp_path) -> None:
    """metrics JSONL (per step) and summary.json (run totals) carry the tiers' bytes and GB/s."""
    from tests.test_train import ZOO_CASES, read_metrics, tiny
    from lmsdp.launcher.train.trainer import run_worker
    from lmsdp.runtime.topology import detect_topology

    config = tiny(tmp_path, "model.name=resnet18", *ZOO_CASES["resnet18"], "swap.enabled=true", "swap.threshold=0",
                  "swap.keep_last=0", "swap.transport=loopback", "swap.host_limit=64KiB", f"swap.disk_dir={tmp_path}/spill")
    assert run_worker(config, detect_topology()) == 0
    records = read_metrics(f"{tmp_path}/out/metrics.rank0.jsonl")
    assert all(r["disk_write_bytes"] > 0 and r["host_tier_bytes"] > 0 and r["disk_read_gbps"] > 0 for r in records)
    with open(f"{tmp_path}/out/summary.json") as handle:
        summary = json.load(handle)
    assert summary["swap_disk_write_bytes"] == sum(r["disk_write_bytes"] for r in records) > 0
    assert summary["swap_disk_write_gbps"] > 0 and os.listdir(f"{tmp_path}/spill") == []
    from lmsdp.launcher.tools.plots import tier_text

    line = tier_text(records[-1])  # the report's memory picture names where the step's bytes went
    assert "host tier" in line and "disk tier wrote" in line and "GB/s" in line and tier_text({}) == ""


def test_spilled_tensors_are_read_back_ahead_of_need(tmp_path) -> None:
    """Two prefetch levels: once the order is learned (step 2 on), every spilled tensor's disk read is
    started ahead by the prefetch loop, none by compute needing it."""
    build, make_input, loss_fn = CASES["gpt"]
    engine = spill_all(str(tmp_path))
    torch.manual_seed(0)
    model, x = build(), make_input()
    try:
        steps = []
        for _ in range(3):
            with engine:
                loss = loss_fn(model, x)
            loss.backward()
            del loss
            steps.append(engine.step_end())
    finally:
        engine.close()
    for st in steps[1:]:
        assert st["disk_reads_forced"] == 0 and st["disk_reads_ahead"] == st["swapped_tensors"] > 0, st


def _forward_spilled(engine: SwapEngine) -> Tuple[torch.Tensor, str]:
    """A forward whose saved tensors are all on disk (writes finished); returns its loss and the largest file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    with engine:
        loss = model(torch.randn(32, 64)).sum()
    store = engine.mover.store
    store._wait_writes(1 << 62)
    folder = store.disk.folder
    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    return loss, max(files, key=os.path.getsize)


@pytest.mark.parametrize("verify", [True, False])
def test_a_damaged_spill_file_is_named(tmp_path, verify: bool) -> None:
    """verify: a flipped byte fails the CRC32; without it a cut-short file still fails the size check."""
    engine = spill_all(str(tmp_path), verify=verify)
    try:
        loss, victim = _forward_spilled(engine)
        with open(victim, "r+b") as handle:
            if verify:
                handle.seek(100)
                byte = handle.read(1)
                handle.seek(100)
                handle.write(bytes([byte[0] ^ 0xFF]))
            else:
                handle.truncate(os.path.getsize(victim) - 8)
        with pytest.raises(DiskTierError) as info:
            loss.backward()
        text = str(info.value)
        assert victim in text and "disk tier" in text and "\n" not in text
        assert ("CRC32" in text) if verify else ("bytes, expected" in text)
        assert not os.path.exists(os.path.dirname(victim))
        del loss
    finally:
        engine.close()


def test_disk_limit_and_its_key_are_one_line(tmp_path) -> None:
    engine = spill_all(str(tmp_path), disk_limit=64 << 10)
    try:
        with pytest.raises(DiskTierError, match=r"^swap\.disk_limit: the disk tier in .* needs .* limit 64\.0 KiB"):
            _forward_spilled(engine)
    finally:
        engine.close()
    with pytest.raises(DiskTierError, match="^swap.disk_limit: set without swap.disk_dir"):
        SwapEngine(SwapConfig(enabled=True, disk_limit=1 << 20), "cpu")


def test_script_mode_reads_the_disk_tier_from_the_environment(tmp_path) -> None:
    from lmsdp.swapping import config_from_env

    cfg = config_from_env({"LMSDP_SWAP": "1", "LMSDP_SWAP_DISK_DIR": str(tmp_path), "LMSDP_SWAP_DISK_LIMIT": "2GiB"})
    assert (cfg.disk_dir, cfg.disk_limit) == (str(tmp_path), 2 << 30)


def test_planner_moves_spilled_bytes_at_the_disk_rate() -> None:
    from lmsdp.swapping.profile import SavedTensor, StepProfile

    tensors = [SavedTensor(1 << 20, f"l{i}", 0.001 * i, 0.001 * (9 - i), 9 - i) for i in range(10)]
    prof = StepProfile(batch=1, recompute=None, tensors=tensors, forward_s=0.01, backward_s=0.01, param_bytes=0,
                       grad_bytes=0, optimizer_bytes=0, workspace_bytes=0, flops=0, module_flops={},
                       module_forward_s={}, module_backward_s={}, recomputed=[], timed="test")
    settings = Settings(0, 2, keep_last=0)
    host_only = predict(prof, settings, 1e9)
    on_disk = predict(prof, settings, 1e9, disk=DiskModel(2 << 20, 1e8, 1e8))
    assert on_disk.step_s > host_only.step_s and on_disk.peak_device_bytes >= host_only.peak_device_bytes
    assert predict(prof, settings, 1e9, disk=DiskModel(1 << 40, 1e8, 1e8)).step_s == host_only.step_s


KILLED = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from lmsdp.swapping import SwapConfig, SwapEngine
    engine = SwapEngine(SwapConfig(enabled=True, threshold=0, keep_last=0, transport="loopback", host_limit=1,
                                   disk_dir=sys.argv[1]), "cpu")
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    with engine:
        loss = model(torch.randn(32, 64)).sum()
    engine.mover.store._wait_writes(1 << 62)
    print(engine.mover.store.disk.folder, flush=True)
    time.sleep(120)  # mid-step: forward done, backward not started
""")


@pytest.mark.integration
def test_a_killed_rank_leaves_no_spill_files_after_the_next_start(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        folder = proc.stdout.readline().strip()
        assert folder.startswith(str(tmp_path)) and any(f.endswith(".bin") for f in os.listdir(folder))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert os.path.isdir(folder)  # SIGKILL: nothing ran at exit
    elsewhere = tmp_path / "rank0-another-host-pid999999"  # a shared disk_dir: another host's pids mean nothing here
    elsewhere.mkdir()
    engine = spill_all(str(tmp_path))
    try:
        assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(engine.mover.store.disk.folder), elsewhere.name])
    finally:
        engine.close()
    assert os.listdir(tmp_path) == [elsewhere.name]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.integration
def test_a_full_disk_is_one_line(tmp_path, small_tmpfs) -> None:
    """A real job (lmsrun, one rank) spilling into a 64 KiB tmpfs: one error line naming folder and tier, exit 2."""
    proc = subprocess.run([LMSRUN, TINY, "-np", "1", "--set", "train.steps=1", "--set", "train.batch_size=64",
                           "--set", f"train.output_dir={tmp_path}/out", "--set", "swap.enabled=true",
                           "--set", "swap.threshold=0", "--set", "swap.keep_last=0", "--set", "swap.transport=loopback",
                           "--set", "swap.host_limit=1", "--set", f"swap.disk_dir={small_tmpfs}"],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=ENV)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("lmsrun: error: swap.disk_dir: the disk tier in "), errors
    assert small_tmpfs in errors[0] and "is full" in errors[0]
    assert os.listdir(small_tmpfs) == []  # the rank's files went before it stopped: the disk is not left full
