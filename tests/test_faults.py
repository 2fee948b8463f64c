"""Fault injection with real processes and real signals: whatever dies (lmsrun, mpirun, a rank),
the job ends within its bound, says why in a few lines and leaves no process behind (checked
against the process tree recorded while it ran); a checkpoint folder is used by one live job;
damaged checkpoints are skipped for the previous one; a full disk and a read-only folder are one
line before training."""
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import psutil
import pytest
import torch

from lmsdp.launcher.train.checkpoint import CheckpointManager
from lmsdp.launcher.train.checkpoint_lock import CheckpointInUse, CheckpointLock
from tests.support import ENV, LMSRUN, REPO, SCRIPTS, TINY, Run, assert_no_leftovers, rank_process

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
SLOW = ("--set", "train.steps=400", "--set", "model.kwargs.delay=0.05", "--set", "train.checkpoint_every=1")
BOUND_S = 15  # a headless job would run for minutes; a dead one ends within a few seconds


class Tree:
    """Every process that was ever a descendant of lmsrun while the job ran."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.seen: dict = {}

    def record(self) -> None:
        try:
            for child in psutil.Process(self.run.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def wait_ranks(self, n: int) -> None:
        def ready() -> bool:
            self.record()
            return sum(1 for p in self.seen.values() if _is_rank(p)) >= n and "step" in self.run.text()
        self.run.wait_for(ready)

    def alive(self) -> list:
        return [p for p in self.seen.values() if _running(p)]

    def wait_gone(self, bound: float = BOUND_S) -> float:
        started = time.monotonic()
        while self.alive():
            if time.monotonic() - started > bound:
                left = [(p.pid, _name(p)) for p in self.alive()]
                for proc in self.alive():
                    proc.kill()
                raise AssertionError(f"still running {bound}s after the fault: {left}")
            time.sleep(0.1)
        return time.monotonic() - started

    def mpirun(self) -> psutil.Process:
        for proc in self.seen.values():
            if _name(proc) in ("mpirun", "mpiexec", "orterun", "prterun"):
                return proc
        raise AssertionError(f"no mpirun among {[_name(p) for p in self.seen.values()]}")


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _is_rank(proc: psutil.Process) -> bool:
    try:
        return "OMPI_COMM_WORLD_RANK" in proc.environ()
    except psutil.Error:
        return False


def _checkpoints(folder) -> set:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


# ---- the launcher dies


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_kill_9_of_lmsrun_ends_every_rank_and_stops_checkpointing(tmp_path):
    run = Run(TINY, *SLOW, "--output-dir", str(tmp_path))
    tree = Tree(run)
    tree.wait_ranks(2)
    run.proc.kill()
    took = tree.wait_gone()
    print(f"kill -9 lmsrun -> every process gone: {took:.2f}s")
    before = _checkpoints(tmp_path / "checkpoints")
    time.sleep(1.0)
    assert _checkpoints(tmp_path / "checkpoints") == before  # nobody writes into the folder any more
    run.wait()
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_kill_9_of_lmsrun_in_script_mode_ends_every_rank():
    run = Run("-np", "2", "--", sys.executable, os.path.join(SCRIPTS, "plain_script.py"), "--sleep", "60",
              script=True)
    tree = Tree(run)
    run.wait_for(lambda: "hello from rank 0" in run.text() and "hello from rank 1" in run.text())
    tree.record()
    run.proc.kill()
    took = tree.wait_gone()
    print(f"kill -9 lmsrun (script mode) -> every process gone: {took:.2f}s")
    run.wait()
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_sighup_to_lmsrun_checkpoints_and_stops_like_sigterm(tmp_path):
    run = Run(TINY, "--set", "train.steps=400", "--set", "model.kwargs.delay=0.05", "--output-dir", str(tmp_path))
    tree = Tree(run)
    tree.wait_ranks(2)
    run.proc.send_signal(signal.SIGHUP)
    code = run.wait()
    err = run.text("err")
    assert code == 128 + signal.SIGHUP, err
    assert "SIGHUP: asking every rank to stop" in err and "stop requested: checkpoint" in err, err
    assert any(n.endswith(".pt") for n in _checkpoints(tmp_path / "checkpoints"))
    tree.wait_gone()
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_kill_9_of_mpirun_is_named_and_leaves_nothing(tmp_path):
    run = Run(TINY, *SLOW, "--output-dir", str(tmp_path))
    tree = Tree(run)
    tree.wait_ranks(2)
    tree.mpirun().kill()
    code = run.wait(timeout=BOUND_S * 2)
    err = run.text("err")
    assert code != 0, err
    assert "mpirun" in err and "SIGKILL" in err, err
    tree.wait_gone()
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rank", [0, 1])
def test_kill_9_of_each_rank_is_named_in_a_few_lines(tmp_path, rank):
    run = Run(TINY, *SLOW, "--output-dir", str(tmp_path))
    tree = Tree(run)
    tree.wait_ranks(2)
    rank_process(run, rank).kill()
    code = run.wait(timeout=BOUND_S * 2)
    err = run.text("err")
    assert code != 0, err
    assert f"lmsrun: rank {rank} was killed by signal 9 (SIGKILL)" in err, err
    summary = err[err.index("lmsrun: rank"):].splitlines()
    assert len([line for line in summary if not line.startswith("  | ")]) <= 5, err
    tree.wait_gone()
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_sigstop_of_a_rank_ends_the_job_after_the_comm_timeout(tmp_path):
    run = Run(TINY, *SLOW, "--set", "comm.backend=torch", "--set", "comm.timeout_s=3",
              "--output-dir", str(tmp_path))
    tree = Tree(run)
    tree.wait_ranks(2)
    victim = rank_process(run, 1)
    victim.suspend()
    try:
        code = run.wait(timeout=60)
    finally:
        if _running(victim):
            victim.resume()
    err = run.text("err")
    assert code != 0, err
    assert "lmsrun: rank" in err, err
    summary = err[err.index("lmsrun: rank"):].splitlines()
    before = err[:err.index("lmsrun: rank")].splitlines()
    assert len([line for line in summary if not line.startswith("  | ")]) <= 5, err
    assert not any("Traceback" in line for line in before), err  # the survivor's traceback stays in its log
    tree.wait_gone()
    assert_no_leftovers(run)


# ---- one live job per checkpoint folder


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_second_job_on_a_held_checkpoint_folder_is_refused(tmp_path):
    first = Run(TINY, *SLOW, "--output-dir", str(tmp_path))
    Tree(first).wait_ranks(2)
    second = Run(TINY, "--resume", "--output-dir", str(tmp_path))
    code = second.wait()
    err = second.text("err").strip().splitlines()
    first.proc.send_signal(signal.SIGTERM)
    first.wait()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("lmsrun: error: train.checkpoint_dir:") \
        and "in use by a running job" in err[0] and f"pid " in err[0], err
    assert_no_leftovers(first)


@pytest.mark.integration
def test_stale_lock_of_a_dead_holder_is_taken_over(tmp_path, capfd):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; from lmsdp.launcher.train.checkpoint_lock import CheckpointLock; "
        f"CheckpointLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointInUse, match=f"pid {holder.pid} on host"):
        CheckpointLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    lock = CheckpointLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's lock
    assert f"locked by a job that is gone (pid {holder.pid}" in capfd.readouterr().err
    lock.release()
    assert not os.path.exists(tmp_path / ".lmsdp.lock")


# ---- damaged checkpoints


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(4096)}, "optimizer": {}}


def _zero(path: str, offset: int, size: int = 4096) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * size)


def _tensor_offset(path: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    with open(path, "rb") as handle:  # local header: 30 bytes + name + extra, then the data
        handle.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("damage", ["truncated", "zeroed-header", "zeroed-tensor-data",
                                    "zeroed-tensor-data-no-digest"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, capfd, damage):
    manager = CheckpointManager(str(tmp_path))
    manager.save(1, _state(1))
    newest = manager.save(2, _state(2))
    if damage == "truncated":
        os.truncate(newest, os.path.getsize(newest) // 2)
    elif damage == "zeroed-header":
        _zero(newest, 0, 512)
    else:
        _zero(newest, _tensor_offset(newest) + 1024)
        if damage.endswith("no-digest"):  # an older checkpoint without a digest: zip CRCs catch it
            os.unlink(newest + ".sha256")
    path, state = manager.load_latest()
    assert path.endswith("step-00000001.pt") and torch.equal(state["model"]["w"], _state(1)["model"]["w"])
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "step-00000002.pt is damaged" in warnings[0], warnings


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
def test_resume_skips_a_checkpoint_with_zeroed_tensor_data(tmp_path):
    assert Run(TINY, "--set", "train.checkpoint_every=3", "--output-dir", str(tmp_path)).wait() == 0
    newest = str(tmp_path / "checkpoints" / "step-00000006.pt")
    _zero(newest, _tensor_offset(newest))
    run = Run(TINY, "--resume", "--set", "train.steps=7", "--output-dir", str(tmp_path))
    code = run.wait()
    err = run.text("err")
    assert code == 0, err
    assert err.count("is damaged") == 1 and "resumed from" in err and "step-00000003.pt at step 3" in err, err


# ---- write failures before training


def test_partial_temp_files_of_a_killed_save_are_removed(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    manager.save(1, _state(1))
    (tmp_path / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    (tmp_path / "step-00000009.pt.sha256").write_text("0" * 64)  # digest whose checkpoint never landed
    (tmp_path / ".tmp-step-00000004").mkdir()  # a sharded save killed mid-write: a folder of shards
    (tmp_path / ".tmp-step-00000004" / "__0_0.distcp").write_bytes(b"part")
    removed = manager.clean_partial()
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-abc123.pt", ".tmp-step-00000004",
                                                            "step-00000009.pt.sha256"]
    assert sorted(os.listdir(tmp_path)) == ["step-00000001.pt", "step-00000001.pt.sha256"]


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = CheckpointManager(str(tmp_path)).save(1, _state(1))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


class _Tmpfs:
    def __init__(self, where: str, options: str) -> None:
        self.where = where
        os.makedirs(where, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", where], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.where], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = _Tmpfs(str(tmp_path / "disk"), "size=1m")
    try:
        yield disk.where
    finally:
        disk.close()


@pytest.fixture
def read_only_disk(tmp_path):
    disk = _Tmpfs(str(tmp_path / "ro"), "size=1m,ro")
    try:
        yield disk.where
    finally:
        disk.close()


def _one_line_error(args, tmp_path) -> str:
    done = subprocess.run([LMSRUN, TINY, "-np", "1", *args, "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("lmsrun: error: checkpoint:"), done.stderr
    assert not os.path.exists(tmp_path / "out" / "metrics.rank0.jsonl") or "step" not in done.stderr
    return lines[0]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_full_disk_is_one_line_before_training(tmp_path, small_disk):
    with open(os.path.join(small_disk, "filler"), "wb") as handle:
        handle.write(b"\0" * (1024 * 1024 - 8192))
    line = _one_line_error(["--set", f"train.checkpoint_dir={small_disk}"], tmp_path)
    assert small_disk in line and ("free" in line or "No space left" in line), line


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_read_only_checkpoint_folder_is_one_line_before_training(tmp_path, read_only_disk):
    line = _one_line_error(["--set", f"train.checkpoint_dir={read_only_disk}/ckpt"], tmp_path)
    assert "Read-only file system" in line, line


def test_save_on_a_full_disk_is_one_line_naming_path_and_cause(small_disk):
    from lmsdp.launcher.train.checkpoint import CheckpointWriteError

    manager = CheckpointManager(small_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        manager.save(1, {"step": 1, "model": {"w": torch.zeros(1 << 19)}})  # 2 MiB into 1 MiB
    text = str(caught.value)
    assert "\n" not in text and "step-00000001.pt" in text and "No space left on device" in text, text
    assert os.listdir(small_disk) == []  # the partial temp file is gone


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_rank_in_place_writes_rank0_log(tmp_path):
    done = subprocess.run([LMSRUN, TINY, "-np", "1", "--output-dir", str(tmp_path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "rank0.log").read_text()
    assert "step 1/6" in log and "step 6/6" in log, log
