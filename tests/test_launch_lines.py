"""Every line a rank prints reaches the user whole (issue 25), with real mpirun through lmsrun in script
mode: a stress of fragmented writes on 4 ranks, Horovod ranks ending with ``print("DONE", rank)``, and a
rank killed in the middle of a line. ``scripts/stress_lines.py`` runs the stress 20 times."""
import importlib.util
import os
import pty
import subprocess
import sys
import time

import pytest

from tests.support import ENV, LMSRUN, REPO, SCRIPTS, Run, assert_no_leftovers

sys.path.insert(0, os.path.join(os.path.dirname(SCRIPTS), "..", "scripts"))
import stress_lines  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.mpi]


@pytest.mark.timeout(300)
def test_fragmented_lines_of_four_ranks_arrive_whole_on_the_terminal_and_in_rank_logs():
    verdict = stress_lines.lines_run(seed=7)
    assert verdict.expected == 8000
    assert verdict.total == 0, (verdict.garbled, verdict.examples)


@pytest.mark.timeout(240)
def test_print_with_several_arguments_is_one_line_and_lmsdp_warns_in_one_line():
    if importlib.util.find_spec("horovod") is None or importlib.util.find_spec("horovod.torch") is None:
        pytest.skip("horovod.torch is not importable (make setup builds it)")
    code, out, err = stress_lines.lmsrun(["-np", "2", "--swap-threshold", "0", "--", sys.executable,
                                          os.path.join(SCRIPTS, "hvd_train.py"), "--steps", "1", "--done-words"], 200)
    assert code == 0, err.decode(errors="replace")
    lines, err_lines = out.decode().splitlines(), err.decode().splitlines()
    assert "DONE 0" in lines and "[1] DONE 1" in lines, lines
    # the engine's CPU notice: one line, rank 0 only, without the source line it points at
    notices = [line for line in err_lines if "the engine runs on cpu" in line]
    assert len(notices) == 1 and notices[0].startswith("[lmsdp] swap: the engine runs on cpu"), err_lines
    assert not any("SwapEngine(" in line or "RuntimeWarning" in line for line in err_lines), err_lines


@pytest.mark.timeout(120)
def test_a_rank_killed_mid_line_gets_its_bytes_then_a_newline(tmp_path):
    script = tmp_path / "die_mid_line.py"
    script.write_text("import os, signal, time\n"
                      "rank = int(os.environ['OMPI_COMM_WORLD_RANK'])\n"
                      "os.write(1, b'rank %d half a li' % rank)\n"
                      "if rank == 1:\n"
                      "    time.sleep(1)\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(60)\n")
    run = Run("-np", "2", "--output-dir", str(tmp_path / "out"), "--", "python", str(script), script=True)
    assert run.wait() == 128 + 9, run.text()
    out = run.text("out").splitlines()
    assert "rank 0 half a li" in out and "[1] rank 1 half a li" in out, out
    assert "lmsrun: rank 1 was killed by signal 9 (SIGKILL)" in run.text("err"), run.text("err")
    assert (tmp_path / "out" / "rank1.log").read_bytes() == b"rank 1 half a li\n"
    assert_no_leftovers(run)


@pytest.mark.timeout(120)
def test_on_a_terminal_a_prompt_and_a_progress_bar_show_live(tmp_path):
    """lmsrun on a terminal (a pty): rank 0's \\r bar redraws as it goes, rank 1's unfinished line shows
    after the idle time, long before its end is printed."""
    script = tmp_path / "live.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['OMPI_COMM_WORLD_RANK'] == '0':\n"
                      "    for k in range(5):\n"
                      "        sys.stdout.write(f'\\rbar {k}/4'); sys.stdout.flush(); time.sleep(0.6)\n"
                      "    print()\n"
                      "else:\n"
                      "    print('Loading ...', end='', flush=True); time.sleep(3); print(' done', flush=True)\n")
    master, terminal = pty.openpty()
    proc = subprocess.Popen([LMSRUN, "-np", "2", "--", "python", str(script)], cwd=REPO, env=ENV,
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen, arrivals = b"", {}
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not data:
            break
        screen += data
        for needle in (b"bar 1/4", b"bar 4/4", b"Loading ...", b" done"):
            if needle in screen and needle not in arrivals:
                arrivals[needle] = time.monotonic()
    os.close(master)
    assert proc.wait(timeout=60) == 0, screen
    assert arrivals[b"bar 4/4"] - arrivals[b"bar 1/4"] > 1.0, screen
    assert arrivals[b" done"] - arrivals[b"Loading ..."] > 1.5, screen
    # rank 0's bar was open meanwhile: the two partial lines take turns, each on a line of its own
    assert b"[1] Loading ..." in screen and b"\rbar 4/4" in screen, screen
