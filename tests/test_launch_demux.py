"""The output demultiplexer on recorded Open MPI --tag-output streams, fed in every possible split."""
import io
import os
import time

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
    # whole lines only: rank 0's 'partial-0' waits for its ' rest' while rank 1's line goes out; rank 0's
    # \r-ended redraw goes out at once, and rank 1's next line starts on a line of its own after it
    assert err == ("[1] rank one line\npartial-0 rest\n\rbar 1\r\n[1] Traceback\n[1] RuntimeError: boom\n"
                   "[1] [lmsdp] rank 1 failed: RuntimeError: boom\nbar 2\n")
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


def tagged(rank: int, data: bytes, size: int = 1024) -> bytes:
    """What Open MPI writes for ``data`` that a rank wrote: every chunk it read tagged, as a pipe cuts it."""
    return b"".join(b"[1,%d]<stdout>:" % rank + data[i:i + size] for i in range(0, len(data), size))


def test_long_lines_and_invalid_utf8_come_through_as_written(tmp_path):
    long_line = b"\xff\xfe" + bytes(range(14, 256)) * 420 + b"\n"  # over 100 kB, not UTF-8, no \r
    stream = b"".join(tagged(0, long_line[i:i + 4096]) + tagged(1, b"one %d\n" % i)
                      for i in range(0, len(long_line), 4096))
    out = io.BytesIO()
    demux = Demux("openmpi", str(tmp_path), out, io.BytesIO())
    buf, current = b"", None
    for start in range(0, len(stream), 65536):  # os.read's size
        buf, current = demux._parse(buf + stream[start:start + 65536], current, "stdout", final=False)
    demux._parse(buf, current, "stdout", final=True)
    demux.flush_partials()
    demux.close()
    lines = out.getvalue().split(b"\n")
    assert lines.count(long_line[:-1]) == 1 and len(lines) == len(long_line) // 4096 + 3
    assert all(line.startswith(b"[1] one ") for line in lines if line and line != long_line[:-1])
    assert (tmp_path / "rank0.log").read_bytes() == long_line


def test_on_a_terminal_a_partial_line_goes_out_after_the_idle_time_and_at_the_end(tmp_path):
    """A real pipe and the reader thread: rank 1's prompt shows after the idle time, without its rest;
    its log waits for the whole line."""
    read_end, write_end = os.pipe()
    out = io.BytesIO()
    demux = Demux("openmpi", str(tmp_path), out, io.BytesIO(), live=["stdout"], idle_s=0.2)
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        thread = demux.reader(stream, "stdout")
        os.write(write_end, b"[1,1]<stdout>:Epoch 1 ...")
        time.sleep(0.05)
        assert out.getvalue() == b""  # not yet idle: it may be the start of a line
        deadline = time.monotonic() + 5
        while not out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert out.getvalue() == b"[1] Epoch 1 ..."
        os.write(write_end, b"[1,1]<stdout>: done\n[1,0]<stdout>:died mid-li")
        os.close(write_end)
        thread.join(timeout=5)
    demux.flush_partials()
    demux.close()
    assert out.getvalue() == b"[1] Epoch 1 ... done\ndied mid-li\n"
    assert (tmp_path / "rank0.log").read_bytes() == b"died mid-li\n"
    assert (tmp_path / "rank1.log").read_bytes() == b"Epoch 1 ... done\n"
    assert list(demux.tails[1]) == ["Epoch 1 ... done"]


def test_into_a_pipe_or_file_a_partial_line_waits_for_its_end():
    read_end, write_end = os.pipe()
    out = io.BytesIO()
    demux = Demux("openmpi", None, out, io.BytesIO(), idle_s=0.05)  # no stream on a terminal
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        thread = demux.reader(stream, "stdout")
        os.write(write_end, b"[1,1]<stdout>:Epoch 1 ...")
        time.sleep(0.5)
        assert out.getvalue() == b""
        os.write(write_end, b"[1,0]<stdout>:zero\n[1,1]<stdout>: done\n")
        os.close(write_end)
        thread.join(timeout=5)
    assert out.getvalue() == b"zero\n[1] Epoch 1 ... done\n"
