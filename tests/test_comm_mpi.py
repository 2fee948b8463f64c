"""Data parallelism with real ranks: ``mpirun -np 2`` for the torch backend and for Horovod's MPI
controller, ``horovodrun --gloo -np 2`` for Horovod's Gloo controller, a single process for the
1 rank x 2b reference. Every job runs tests/comm_scripts/dp_check.py (rank 0 writes JSON) once per
module; the tests below compare its sections. See dp_check.py for what each section does."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from lmsdp.comm import STAT_KEYS, horovod_available, load_trace

from tests.support import REPO_PATH as REPO
SCRIPT = REPO / "tests" / "comm_scripts" / "dp_check.py"
VENV_BIN = Path(sys.executable).parent
BATCH = 4  # per rank; the single-process reference uses 2 * BATCH
HAVE_HVD = horovod_available()
needs_hvd = pytest.mark.skipif(not HAVE_HVD, reason="horovod.torch does not import (Horovod not built)")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "HOROVOD_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _procs_with(marker: str) -> List[int]:
    """PIDs of live processes whose command line contains ``marker`` (our unique --out path)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                pids.append(int(d))
    return pids


def run_job(launcher: List[str], out: Path, args: List[str], timeout: float = 180,
            wait_for_out: bool = False, extra_env: Optional[Dict[str, str]] = None) -> dict:
    """Run dp_check.py under ``launcher`` in its own session; kill the whole session afterwards (or
    on timeout) so nothing is left behind. ``wait_for_out``: return as soon as rank 0 wrote its JSON
    (a hanging peer may still be alive; it is killed)."""
    cmd = launcher + [sys.executable, str(SCRIPT), "--result", str(out)] + args
    env = _env()
    env.update(extra_env or {})
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=str(REPO))
    log = ""
    try:
        if wait_for_out:
            while time.monotonic() - t0 < timeout and proc.poll() is None and not out.exists():
                time.sleep(0.1)
            time.sleep(0.3)  # let rank 0 finish writing
        else:
            log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        more, _ = proc.communicate()
        log += more or ""
    for pid in _procs_with(str(out)):  # ranks that left the session (none expected)
        os.kill(pid, signal.SIGKILL)
    assert out.exists(), f"no result from {' '.join(cmd)} (rc {proc.returncode}):\n{log[-4000:]}"
    res = json.loads(out.read_text())
    res["_log"], res["_rc"], res["_wall_s"] = log, proc.returncode, time.monotonic() - t0
    assert "exception" not in res, res["exception"]
    return res


def mpirun(n: int = 2) -> List[str]:
    return ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none"]


def horovodrun_gloo(n: int = 2) -> List[str]:
    return [str(VENV_BIN / "horovodrun"), "--gloo", "-np", str(n), "-H", f"localhost:{n}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """1 rank x batch 2b with the torch backend in a plain single process (no launcher)."""
    out = tmp_path_factory.mktemp("ref") / "ref.json"
    return run_job([], out, ["--backend", "torch", "--batch", str(2 * BATCH), "--sections", "train"])


JOBS = {
    "torch-mpirun": (mpirun, "torch", "torch (gloo, rendezvous mpi4py"),
    "horovod-mpi": (mpirun, "horovod", "horovod (mpi controller)"),
    "horovod-gloo": (horovodrun_gloo, "horovod", "horovod (gloo controller)"),
}
_results: Dict[str, dict] = {}


@pytest.fixture(scope="module", params=[
    pytest.param(k, marks=[pytest.mark.horovod] if JOBS[k][1] == "horovod" else []) for k in JOBS])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    launcher, backend, desc = JOBS[request.param]
    if backend == "horovod" and not HAVE_HVD:
        pytest.skip("horovod.torch does not import (Horovod not built)")
    if launcher is mpirun and shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    if request.param not in _results:
        d = tmp_path_factory.mktemp(request.param)
        res = run_job(launcher(2), d / "out.json",
                      ["--backend", backend, "--batch", str(BATCH), "--chrome-trace", str(d / "trace.json")])
        assert res["description"].startswith(desc), res["description"]
        res["_name"] = request.param
        _results[request.param] = res
    return _results[request.param]


pytestmark = [pytest.mark.integration, pytest.mark.mpi]


def test_two_real_ranks(job: dict) -> None:
    assert job["size"] == 2 and job["local_size"] == 2 and job["_rc"] == 0, job["_log"][-2000:]


def test_allgather_object_of_different_types_per_rank(job: dict) -> None:
    """Horovod names an unnamed allgather_object after the object's type: a list on rank 0 and None on
    rank 1 waited for each other forever (resume's checkpoint-kind exchange hung under Horovod)."""
    assert job["objects"] == [["rank 0's list"], None], job["_log"][-2000:]


def test_broadcast_makes_rank0_state_everyones(job: dict) -> None:
    b = job["broadcast"]
    assert b["before"][0] != b["before"][1]  # different weights before (else the test proves nothing)
    assert b["after"] == [b["rank0_before"]] * 2
    assert b["opt_after"][0] == b["opt_after"][1] != "empty"  # rank 1 got rank 0's Adam state


def test_params_identical_across_ranks_after_training(job: dict) -> None:
    shas = job["train"]["sha"]
    assert len(shas) == 2 and shas[0] == shas[1]
    assert len(job["train"]["stats"]) == 4


def test_two_ranks_equal_one_rank_with_double_batch(job: dict, reference: dict) -> None:
    assert reference["size"] == 1
    a, b = job["train"]["params"], reference["train"]["params"]
    assert len(a) == len(b) > 100
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert job["train"]["ref_max_diff"] < 1e-5  # same, against a no-comm SGD run in the same process
    assert len(job["train"]["losses"]) == 4


def test_fp16_compression_changes_results_slightly(job: dict) -> None:
    full, half = job["train"]["params"], job["fp16"]["params"]
    diff = max(abs(x - y) for x, y in zip(full, half))
    assert 0 < diff < 1e-3, diff
    assert job["fp16"]["sha"][0] == job["fp16"]["sha"][1]
    # fp16 on the wire: half the bytes
    assert job["fp16"]["stats"][0]["allreduce_bytes"] * 2 == job["train"]["stats"][0]["allreduce_bytes"]


def test_backward_passes_per_step_reduces_every_second_backward(job: dict) -> None:
    b = job["bpps"]
    assert b["after_first"]["allreduce_count"] == 0 and b["after_first"]["backward_passes"] == 1
    assert b["grad_sha_first"][0] != b["grad_sha_first"][1]  # local gradients, not reduced
    assert b["after_second"]["allreduce_count"] > 0
    assert b["grad_sha_second"][0] == b["grad_sha_second"][1]
    assert b["expected_max_diff"] < 1e-6  # mean over ranks of (g1 + g2)


def test_step_stats_and_trace(job: dict) -> None:
    for s in job["train"]["stats"]:
        assert set(STAT_KEYS) <= set(s)
        assert s["allreduce_count"] >= 1 and s["allreduce_ms"] > 0 and s["comm_wait_ms"] >= 0
        assert 0.0 <= s["allreduce_hidden_frac"] <= 1.0
        assert s["backward_passes"] == 1
    # buckets/fusion at 600 bytes over a 1936-byte model: several reductions, some launched mid-backward
    assert max(s["allreduce_count"] for s in job["train"]["stats"]) >= 3
    trace = Path(job["trace"])
    events = load_trace(str(trace))
    rank1 = trace.with_name(trace.stem + ".rank1" + trace.suffix)
    events1 = load_trace(str(rank1))
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0}
    assert {e["pid"] for e in events1 if e["ph"] == "X"} == {1}
    assert any(e["name"].startswith("allreduce") for e in events1 if e["ph"] == "X")


def test_backends_agree_bit_for_bit() -> None:
    """Same seed, data and split: both backends and both controllers end at the same parameters."""
    if len(_results) < 2:
        pytest.skip("needs at least two backend jobs from the tests above")
    shas = {name: r["train"]["sha"][0] for name, r in _results.items()}
    assert len(set(shas.values())) == 1, shas


@needs_mpirun
@pytest.mark.parametrize("kind", ["torch-mpirun", pytest.param("horovod-mpi", marks=[pytest.mark.horovod, needs_hvd]),
                                  pytest.param("horovod-gloo", marks=[pytest.mark.horovod, needs_hvd])])
def test_dead_peer_gives_comm_error_not_hang(kind: str, tmp_path: Path) -> None:
    """Rank 1 exits abruptly at step 2 (the launcher told not to tear the job down on its own)."""
    timeout = 5.0
    backend = kind.split("-")[0]
    out = tmp_path / "dead.json"
    if kind == "horovod-gloo":
        launcher, how = horovodrun_gloo(2), "exit0"
    else:
        launcher, how = mpirun(2)[:4] + ["--mca", "orte_abort_on_non_zero_status", "0"], "exit"
    t0 = time.monotonic()
    res = run_job(launcher, out, ["--backend", backend, "--sections", "dead", "--dead", how,
                                  "--timeout", str(timeout)], timeout=60)
    d = res["dead"]
    assert d["type"] == "CommError" and d["step"] == 2, d
    assert d["backend"] == backend and d["peer"] == 1
    assert d["error"].startswith(f"{backend} backend: allreduce with peer rank 1 (process gone)"), d
    assert d["elapsed_s"] < timeout + 2
    assert time.monotonic() - t0 < 50
    assert _procs_with(str(out)) == []


def test_stuck_peer_times_out_with_comm_error(tmp_path: Path) -> None:
    """Rank 1 stays alive but stops taking part (torchrun-style env rendezvous, two plain processes):
    rank 0's collective fails after timeout_s, not later and not never."""
    timeout = 3.0
    out = tmp_path / "stuck.json"
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    try:
        for r in range(2):
            env = _env()
            env.update(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), "--result", str(out), "--backend", "auto", "--sections", "dead",
                 "--dead", "hang", "--timeout", str(timeout)], env=env, start_new_session=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        procs[0].communicate(timeout=60)  # rank 0 leaves by itself once it has the error
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate()
    d = json.loads(out.read_text())["dead"]
    assert d["type"] == "CommError" and d["step"] == 2 and d["peer"] == 1, d
    assert "timed out" in d["error"] and d["error"].startswith("torch backend:")
    assert timeout - 0.5 < d["elapsed_s"] < timeout + 3, d
    assert time.monotonic() - t0 < 60
    assert _procs_with(str(out)) == []


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_mpirun
@pytest.mark.parametrize("backend", ["torch", pytest.param("horovod", marks=[pytest.mark.horovod, needs_hvd])])
def test_swap_engine_on_gives_same_params(backend: str, tmp_path: Path) -> None:
    """2 ranks with the swap engine (loopback transport) around forward == the same run without it."""
    try:
        from lmsdp.swapping import SwapEngine  # noqa: F401
    except ImportError:
        pytest.skip("lmsdp.swapping.SwapEngine does not exist yet")
    res = run_job(mpirun(2), tmp_path / "swap.json",
                  ["--backend", backend, "--batch", str(BATCH), "--sections", "swap"])
    on, off = res["swap_on"], res["swap_off"]
    assert on["sha"][0] == on["sha"][1]
    assert on["params"] == off["params"]  # bit for bit
    assert sum(s.get("swap_out_bytes", 0) for s in on["swap_stats"]) > 0  # the engine really swapped
    for comm_stats, swap_stats in zip(on["stats"], on["swap_stats"]):
        assert not set(comm_stats) & set(swap_stats)  # the worker merges them into one record
        assert comm_stats["allreduce_count"] >= 1 and "hidden_frac" in swap_stats
