"""Real multi-rank runs through ``lmsrun`` and Open MPI's mpirun: training to the end, a rank that
raises, a rank that is SIGKILLed, SIGTERM to lmsrun then --resume, a UserError inside ranks.

Every test checks that no process of the job is left: no child of this test process, and no process
whose command line carries the test's unique marker (passed as the job name)."""
import os
import shutil
import signal
import time

import pytest

from tests.support import REPO, TINY, Run, assert_no_leftovers, metric_lines, rank_process

pytestmark = [pytest.mark.integration, pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")]


@pytest.mark.timeout(240)
def test_two_ranks_train_quickstart_to_the_end(tmp_path):
    out = str(tmp_path / "out")
    run = Run(os.path.join(REPO, "configs", "quickstart.yaml"), "--set", "train.steps=6", "--set",
              "train.log_every=2", "--output-dir", out)
    code = run.wait()
    assert code == 0, run.text()
    for rank in (0, 1):
        records = metric_lines(os.path.join(out, f"metrics.rank{rank}.jsonl"))
        assert [r["step"] for r in records] == list(range(1, 7)), rank
        assert os.path.exists(os.path.join(out, f"rank{rank}.log"))
    assert "[lmsdp] step 6/6" in open(os.path.join(out, "rank0.log")).read()
    err = run.text("err")
    assert "[lmsdp] step 6/6" in err  # rank 0's progress, not prefixed
    assert not any(line.startswith("[0] ") for line in err.splitlines())
    assert "[lmsdp] step" not in open(os.path.join(out, "rank1.log")).read()  # only rank 0 draws progress
    assert os.path.exists(os.path.join(out, "summary.json"))
    assert_no_leftovers(run)


@pytest.mark.timeout(180)
def test_rank_raises_at_step_3_stops_everything(tmp_path):
    run = Run(TINY, "--set", "model.kwargs.fail=raise", "--set", "train.steps=100",
              "--set", "model.kwargs.delay=0.05", "--output-dir", str(tmp_path))
    code = run.wait()
    failed_at = run.first_time("rank 1 failed: RuntimeError: injected failure at step 3")
    err = run.text("err")
    assert code != 0, err
    assert "lmsrun: rank 1 failed: RuntimeError: injected failure at step 3" in err
    assert "lmsrun: last lines of rank 1:" in err and "  | RuntimeError: injected failure at step 3" in err
    assert len(metric_lines(str(tmp_path / "metrics.rank0.jsonl"))) <= 3  # rank 0 did not train on alone
    print(f"failure -> lmsrun exit: {run.ended - failed_at:.2f}s (whole run {run.ended - run.started:.1f}s)")
    assert run.ended - failed_at < 15, f"{run.ended - failed_at:.1f}s from failure to exit"
    assert_no_leftovers(run)


@pytest.mark.timeout(180)
def test_rank_sigkilled_stops_everything(tmp_path):
    run = Run(TINY, "--set", "train.steps=1000", "--set", "model.kwargs.delay=0.05", "--output-dir", str(tmp_path))
    run.wait_for(lambda: len(metric_lines(str(tmp_path / "metrics.rank1.jsonl"))) >= 2)
    victim = rank_process(run, 1)
    killed_at = time.monotonic()
    victim.kill()
    code = run.wait()
    err = run.text("err")
    assert code != 0, err
    assert "lmsrun: rank 1 was killed by signal 9 (SIGKILL)" in err, err
    print(f"kill -> lmsrun exit: {run.ended - killed_at:.2f}s")
    assert run.ended - killed_at < 15
    assert len(metric_lines(str(tmp_path / "metrics.rank0.jsonl"))) < 1000
    assert_no_leftovers(run)


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_every_rank_and_resume_finishes(tmp_path):
    steps = 40
    args = (TINY, "--set", f"train.steps={steps}", "--set", "model.kwargs.delay=0.05", "--output-dir", str(tmp_path))
    run = Run(*args)
    run.wait_for(lambda: len(metric_lines(str(tmp_path / "metrics.rank1.jsonl"))) >= 3)
    run.proc.send_signal(signal.SIGTERM)
    code = run.wait()
    err = run.text("err")
    assert code == 128 + signal.SIGTERM, err
    assert "stop requested: checkpoint" in err
    saved = sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".pt"))  # not the .sha256 digests
    assert saved and saved[-1] != f"step-{steps:08d}.pt", saved
    stopped_at = [r["step"] for r in metric_lines(str(tmp_path / "metrics.rank1.jsonl"))][-1]
    assert saved[-1] == f"step-{stopped_at:08d}.pt"  # every rank stopped after the same step
    assert stopped_at < steps
    assert_no_leftovers(run)

    resumed = Run(*args, "--resume")
    assert resumed.wait() == 0, resumed.text()
    assert f"resumed from" in resumed.text("err")
    for rank in (0, 1):
        assert [r["step"] for r in metric_lines(str(tmp_path / f"metrics.rank{rank}.jsonl"))][-1] == steps
    assert os.path.exists(tmp_path / "checkpoints" / f"step-{steps:08d}.pt")
    assert_no_leftovers(resumed)


@pytest.mark.timeout(180)
def test_user_error_inside_ranks_is_one_line(tmp_path):
    # the ranks are told to expect 3 ranks while mpirun starts 2: TopologyError inside every rank
    run = Run(TINY, "--mpi-args", "-x LMSDP_EXPECTED_NP=3", "--output-dir", str(tmp_path))
    code = run.wait()
    err = run.text("err")
    assert code == 2, err
    errors = [line for line in err.splitlines() if "lmsrun: error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("lmsrun: error: the job was meant to have 3 ranks (LMSDP_EXPECTED_NP) but "
                                "openmpi started 2"), err
    assert "Traceback" not in err
    assert_no_leftovers(run)


@pytest.mark.timeout(180)
def test_sigint_reaches_every_rank_which_checkpoints(tmp_path):
    run = Run(TINY, "--set", "train.steps=400", "--set", "model.kwargs.delay=0.05", "--output-dir", str(tmp_path))
    run.wait_for(lambda: len(metric_lines(str(tmp_path / "metrics.rank1.jsonl"))) >= 2)
    run.proc.send_signal(signal.SIGINT)  # what Ctrl-C on a terminal sends to lmsrun
    code = run.wait()
    assert code == 128 + signal.SIGINT, run.text()
    last = {rank: metric_lines(str(tmp_path / f"metrics.rank{rank}.jsonl"))[-1]["step"] for rank in (0, 1)}
    assert last[0] == last[1] < 400  # both ranks stopped after the same step ...
    assert os.path.exists(tmp_path / "checkpoints" / f"step-{last[0]:08d}.pt")  # ... which was saved
    assert_no_leftovers(run)
