"""Script mode: ``lmsrun -np 2 [--swap-...] -- python script.py`` runs a user's own script on every rank."""
import importlib.util
import os
import signal
import time

import pytest

from tests.support import ENV, SCRIPTS, Run, assert_no_leftovers

PLAIN = os.path.join(SCRIPTS, "plain_script.py")
HVD = os.path.join(SCRIPTS, "hvd_train.py")

pytestmark = [pytest.mark.integration, pytest.mark.mpi]


def user_site(tmp_path) -> dict:
    """A pre-existing sitecustomize of the user's, which lmsrun's must run too."""
    site = tmp_path / "usersite"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV['PYTHONPATH']}"}


@pytest.mark.timeout(120)
def test_plain_script_runs_on_every_rank_with_prefix_and_chained_sitecustomize(tmp_path):
    run = Run("-np", "2", "--swap-threshold", "2MiB", "--output-dir", str(tmp_path), "--",
              "python", PLAIN, "alpha", "beta", script=True, env=user_site(tmp_path))
    assert run.wait() == 0, run.text()
    out, err = run.text("out"), run.text("err")
    assert "hello from rank 0 of 2 words=['alpha', 'beta']" in out.splitlines()  # rank 0: no prefix
    assert "[1] hello from rank 1 of 2 words=['alpha', 'beta']" in out.splitlines()
    assert "[1] rank 1 to stderr" in err.splitlines() and "rank 0 to stderr" in err.splitlines()
    for rank, prefix in ((0, ""), (1, "[1] ")):
        assert f"{prefix}rank {rank} user_sitecustomize=1 swap=1 threshold=2MiB omp=" in out, out
    # the swap engine came up in both ranks through lmsrun's sitecustomize, and reported at exit
    assert err.count("[lmsdp swap] ") == 2, err
    assert "hello from rank 1" in (tmp_path / "rank1.log").read_text()
    assert_no_leftovers(run)


@pytest.mark.timeout(120)
def test_script_exit_code_and_failed_rank_are_reported():
    run = Run("-np", "2", "--", "python", PLAIN, "--exit-rank", "1", "--code", "7", "--sleep", "60", script=True)
    code = run.wait()
    err = run.text("err")
    assert code == 7, err
    assert "lmsrun: rank 1 exited with code 7" in err and "  | rank 1 exits with 7" in err, err
    assert run.ended - run.first_time("rank 1 exits with 7") < 15
    assert_no_leftovers(run)


@pytest.mark.timeout(120)
def test_sigterm_reaches_script_ranks():
    run = Run("-np", "2", "--", "python", PLAIN, "--sleep", "120", script=True)
    run.wait_for(lambda: "[1] hello from rank 1 of 2 words=[]" in run.text("out"))
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM, run.text()
    assert run.ended - sent < 15
    assert_no_leftovers(run)


@pytest.mark.timeout(240)
def test_plain_horovod_script_swaps_without_edits():
    if importlib.util.find_spec("horovod") is None or importlib.util.find_spec("horovod.torch") is None:
        pytest.skip("horovod.torch is not importable (make setup builds it)")
    source = open(HVD).read()
    assert "import lmsdp" not in source and "from lmsdp" not in source  # a plain user script
    run = Run("-np", "2", "--swap-threshold", "64KiB", "--swap-prefetch", "2", "--swap-keep-last", "1", "--",
              "python", HVD, "--steps", "3", script=True)
    assert run.wait() == 0, run.text()
    out, err = run.text("out"), run.text("err")
    assert "DONE rank=0 steps=3" in out and "[1] DONE rank=1 steps=3" in out
    stats = [line for line in err.splitlines() if "[lmsdp swap]" in line]
    assert len(stats) == 2 and any(line.startswith("[1] [lmsdp swap]") for line in stats), err
    for line in stats:
        swapped = int(line.split("swapped_out=", 1)[1].split()[0])
        assert swapped > 0, line
    assert_no_leftovers(run)
