"""The private error folders lmsrun makes for its ranks (``/tmp/lmsdp-errors-*``): a folder left by a
killed lmsrun is removed by the next one, a live job's never; a failed job's records (the surviving
rank's traceback, which it kept off its output) stay in the run's output folder under errors/."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from lmsdp.runtime.error_file import (ERROR_DIR_PREFIX, OWNER_FILE, make_error_dir, remove_stale_error_dirs)
from lmsdp.runtime.lifeline import Launcher, start_time
from tests.support import ENV, LMSRUN, REPO, TINY, Run, assert_no_leftovers, rank_process

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
SLOW = ("--set", "train.steps=400", "--set", "model.kwargs.delay=0.05")


@pytest.fixture
def tmpdir_short():
    """A short TMPDIR of the test's own (Open MPI's session sockets need short paths), so the
    folders another job on this machine makes are never in the picture."""
    path = tempfile.mkdtemp(prefix="lmsdp-t", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _gone_process() -> Launcher:
    """The identity of a real process that has exited (pid and start time read while it ran)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = Launcher(Launcher.this_process().host, child.pid, start_time(child.pid))
    child.communicate(b"")
    assert not owner.alive()
    return owner


def test_only_folders_of_gone_local_owners_are_removed(tmpdir_short):
    gone = make_error_dir(_gone_process(), tmpdir_short)
    live = make_error_dir(Launcher.this_process(), tmpdir_short)
    elsewhere = make_error_dir(Launcher("another-host.invalid", 1, "1"), tmpdir_short)
    unowned = tempfile.mkdtemp(prefix=ERROR_DIR_PREFIX, dir=tmpdir_short)  # an older lmsrun's, or being made
    reused = make_error_dir(Launcher.this_process(), tmpdir_short)  # our pid, another start time: a reused pid
    me = Launcher.this_process()
    with open(os.path.join(reused, OWNER_FILE), "w") as handle:
        handle.write(Launcher(me.host, me.pid, str(int(me.started) + 1)).encode())
    other = os.path.join(tmpdir_short, "not-ours")
    os.mkdir(other)

    assert sorted(remove_stale_error_dirs(tmpdir_short)) == sorted([gone, reused])
    assert sorted(os.listdir(tmpdir_short)) == sorted(os.path.basename(p) for p in (live, elsewhere, unowned, other))


def _error_dir_of(run: Run) -> str:
    run.wait_for(lambda: "step" in run.text())
    return rank_process(run, 0).environ()["LMSDP_ERROR_DIR"]


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
def test_next_lmsrun_removes_the_folder_of_a_killed_one_and_keeps_a_live_ones(tmpdir_short, tmp_path):
    env = {**ENV, "TMPDIR": tmpdir_short}
    killed = Run(TINY, *SLOW, "--output-dir", str(tmp_path / "killed"), env=env)
    live = Run(TINY, *SLOW, "--output-dir", str(tmp_path / "live"), env=env)
    try:
        killed_dir, live_dir = _error_dir_of(killed), _error_dir_of(live)
        assert os.path.dirname(killed_dir) == os.path.dirname(live_dir) == tmpdir_short
        killed.proc.kill()  # kill -9: no clean-up of its own
        killed.wait(timeout=30)
        psutil.wait_procs([p for p in psutil.process_iter() if _in_job(p, killed_dir)], timeout=15)
        assert os.path.isdir(killed_dir)

        done = subprocess.run([LMSRUN, "-np", "2", "--", sys.executable, "-c", "pass"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(killed_dir)
        assert os.path.isdir(live_dir) and live.proc.poll() is None
        left = sorted(n for n in os.listdir(tmpdir_short) if n.startswith(ERROR_DIR_PREFIX))
        assert left == [os.path.basename(live_dir)]  # the second lmsrun's own folder went at its end too
    finally:
        for run in (killed, live):
            if run.proc.poll() is None:
                run.proc.kill()
            run.wait(timeout=30)
    assert_no_leftovers(live)


def _in_job(proc: psutil.Process, error_dir: str) -> bool:
    try:
        return proc.environ().get("LMSDP_ERROR_DIR") == error_dir
    except psutil.Error:
        return False


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
def test_failed_job_keeps_the_survivors_traceback_in_the_output_folder(tmpdir_short, tmp_path):
    # rank 1 hangs inside forward; rank 0's allreduce times out: a consequence, so rank 0 prints one
    # line and its traceback goes only to its error file, which must outlive the job
    out = tmp_path / "run"
    run = Run(TINY, "--set", "model.kwargs.fail=hang", "--set", "train.steps=20", "--set", "comm.backend=torch",
              "--set", "comm.timeout_s=2", "--output-dir", str(out), env={**ENV, "TMPDIR": tmpdir_short})
    code = run.wait(timeout=120)
    err = run.text("err")
    assert code != 0, err
    assert "Traceback" not in err, err
    assert f"lmsrun: each failed rank's traceback is kept in {out / 'errors'}{os.sep}: rank0.json" in err, err
    assert os.listdir(out / "errors") == ["rank0.json"]
    record = json.loads((out / "errors" / "rank0.json").read_text())
    assert record["rank"] == 0 and record["type"] == "CommError"
    assert record["traceback"].startswith("Traceback (most recent call last):"), record["traceback"]
    assert "in run_rank" in record["traceback"] and "CommError: torch backend: allreduce" in record["traceback"]
    assert not [n for n in os.listdir(tmpdir_short) if n.startswith(ERROR_DIR_PREFIX)]
    assert_no_leftovers(run)
