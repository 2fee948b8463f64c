"""Failures travel as files: a failing rank writes rank<R>.json into the job's error folder and
lmsrun reports it, even when the rank's own output never reaches lmsrun (stdout/stderr closed, or
the failure line buried under a flood). Script mode too, through the sitecustomize; and a script
that uses mpi4py and raises on one rank aborts the whole job instead of hanging in MPI_Finalize."""
import json
import os
import shutil
import sys
import time

import pytest

from lmsdp.runtime.error_file import read_errors, write_error
from tests.support import SCRIPTS, TINY, Run, assert_no_leftovers

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def test_error_file_roundtrip_and_earliest_first(tmp_path):
    for rank, message in ((2, "late"), (0, "early")):
        try:
            raise RuntimeError(message)
        except RuntimeError as exc:
            write_error(exc, rank, str(tmp_path))
        time.sleep(0.01)
    (tmp_path / "rank7.json").write_text("{not json")  # a damaged file is skipped, not fatal
    records = read_errors(str(tmp_path))
    assert [r.rank for r in records] == [2, 0]
    assert records[0].reason == "RuntimeError: late" and "Traceback" in records[0].traceback
    data = json.loads((tmp_path / "rank0.json").read_text())
    assert {"rank", "type", "message", "traceback", "time", "host", "pid"} <= set(data)


def test_first_failure_of_a_rank_wins(tmp_path):
    write_error(ValueError("first"), 1, str(tmp_path))
    write_error(KeyError("second"), 1, str(tmp_path))
    assert read_errors(str(tmp_path))[0].message == "first"


def test_no_error_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSDP_ERROR_DIR", raising=False)
    assert write_error(ValueError("x"), 0) is None


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fail,message", [("raise-closed", "silent failure at step 3"),
                                          ("raise-flood", "flooded failure at step 3")])
def test_config_mode_failure_reported_from_error_file(tmp_path, fail, message):
    run = Run(TINY, "--set", f"model.kwargs.fail={fail}", "--set", "train.steps=50",
              "--set", "model.kwargs.delay=0.02", "--output-dir", str(tmp_path))
    code = run.wait()
    err = run.text("err")
    assert code != 0, err
    assert f"lmsrun: rank 1 failed: RuntimeError: {message}" in err, err
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
def test_script_mode_failure_with_closed_output_reported_from_error_file():
    run = Run("-np", "2", "--", sys.executable, os.path.join(SCRIPTS, "failing_script.py"), "--how", "closed",
              script=True)
    code = run.wait()
    err = run.text("err")
    assert code != 0, err
    assert "lmsrun: rank 1 failed: ValueError: script failed silently on rank 1" in err, err
    assert_no_leftovers(run)


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(180)
def test_mpi4py_script_raising_on_one_rank_aborts_the_job():
    run = Run("-np", "2", "--", sys.executable, os.path.join(SCRIPTS, "failing_script.py"), "--how", "mpi4py",
              script=True)
    failed_at = None
    code = run.wait(timeout=120)
    err = run.text("err")
    assert code != 0, err
    failed_at = run.first_time("mpi4py script failed on rank 1")
    assert "lmsrun: rank 1 failed: ValueError: mpi4py script failed on rank 1" in err, err
    assert run.ended - failed_at < 15, f"{run.ended - failed_at:.1f}s from the failure to the end of the job"
    assert_no_leftovers(run)
