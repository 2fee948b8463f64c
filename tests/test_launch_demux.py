"""The output demultiplexer on recorded Open MPI --tag-output streams, fed in every possible split."""
import io

import pytest

from lmsdp.launcher.launch.demux import Demux
from lmsdp.launcher.launch.spawn import Runner

STREAM = (b"[1,0]<stderr>:partial-0[1,1]<stderr>:rank one line\n"
          b"[1,0]<stderr>: rest\n"
          b"[1,0]<stderr>:\rbar 1\rbar 2[1,1]<stderr>:Traceback\n[1,1]<stderr>:RuntimeError: boom\n"
          b"[1,1]<stderr>:[lmsdp] rank 1 failed: RuntimeError: boom\n"
          b"--------------------------------------------------------------------------\n"
          b"mpirun detected that one or more processes exited with non-zero status, thus causing\n"
          b"  Process name: [[4242,1],1]\n  Exit code:    1\n"
          b"[1,0]<stderr>:\n")


def feed(data: bytes, cut: int, tmp_path=None):
    out, err = io.BytesIO(), io.BytesIO()
    demux = Demux("openmpi", str(tmp_path) if tmp_path else None, out, err)
    buf, current = b"", None
    for piece in (data[:cut], data[cut:]):
        buf, current = demux._parse(buf + piece, current, "stderr", final=False)
    demux._parse(buf, current, "stderr", final=True)
    demux.flush_partials()
    demux.close()
    return demux, err.getvalue().decode()


@pytest.mark.parametrize("cut", range(0, len(STREAM) + 1))
def test_any_read_boundary_gives_the_same_result(cut):
    demux, err = feed(STREAM, cut)
    # rank 0 passes through unchanged (its \r redraws included); rank 1 is line-prefixed and starts on a
    # line of its own when rank 0 stopped mid-line (it used to glue onto 'partial-0' and the bar)
    assert err == ("partial-0\n[1] rank one line\n rest\n\rbar 1\rbar 2\n[1] Traceback\n[1] RuntimeError: boom\n"
                   "[1] [lmsdp] rank 1 failed: RuntimeError: boom\n\n")
    assert demux.own[0].startswith("-----") and "  Process name: [[4242,1],1]" in demux.own
    assert list(demux.tails[0]) == ["partial-0 rest", "bar 2"]
    assert demux.marks == [(1, "RuntimeError: boom")]
    failure = Runner._failure(demux, "\n".join(demux.own))
    assert (failure.rank, failure.reason, failure.exit_code) == (1, "RuntimeError: boom", 1)


def test_rank_logs(tmp_path):
    feed(STREAM, 40, tmp_path)
    assert (tmp_path / "rank1.log").read_text() == ("rank one line\nTraceback\nRuntimeError: boom\n"
                                                    "[lmsdp] rank 1 failed: RuntimeError: boom\n")
    assert (tmp_path / "rank0.log").read_bytes() == b"partial-0 rest\n\rbar 1\rbar 2\n"


def test_killed_rank_is_named():
    own = "mpirun noticed that process rank 1 with PID 0 on node n1 exited on signal 9 (Killed)."
    failure = Runner._failure(Demux("openmpi", None, io.BytesIO(), io.BytesIO()), own)
    assert (failure.rank, failure.signal) == (1, 9)
