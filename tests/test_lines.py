"""The whole-line rule of lmsrun's outputs (launcher/launch/lines.py): per-writer line buffers into shared
sinks, fed in every split of the writes; rank0.log of an in-process job by the same rule."""
import io
import itertools
import os
import sys

import pytest

from lmsdp.launcher.launch.lines import MAX_PENDING, LineBuffer, LineSink
from lmsdp.launcher.launch.rank_log import tee_rank_log


def run(writes, redraws=(0,), idle=()):
    """Feed (writer, bytes) writes through one buffer per writer into one sink; ``idle``: the indexes of
    writes before which every writer has been quiet long enough for its partial line to go out."""
    out = bytearray()
    sink = LineSink(out.extend)
    buffers, lines = {}, []
    clock = 0.0
    for index, (writer, data) in enumerate(writes):
        if index in idle:
            clock += 1.0
            for name, buffer in buffers.items():
                piece = buffer.idle(clock, 0.5)
                if piece:
                    sink.put(name, piece.data, prefix(name))
        buffer = buffers.setdefault(writer, LineBuffer(redraws=writer in redraws))
        for piece in buffer.feed(data, clock):
            sink.put(writer, piece.data, prefix(writer))
            if piece.line is not None:
                lines.append((writer, piece.line))
    for name, buffer in buffers.items():
        piece = buffer.end()
        if piece:
            sink.put(name, piece.data, prefix(name))
            lines.append((name, piece.line))
    sink.end_line()
    return bytes(out), lines


def prefix(writer):
    return b"" if writer == 0 else f"[{writer}] ".encode()


def test_print_with_several_arguments_is_one_line_between_other_ranks_lines():
    # the issue's case: print("DONE", 0) is four writes; rank 1's whole line arrives in between
    out, lines = run([(0, b"DONE"), (1, b"DONE 1\n"), (0, b" "), (0, b"0"), (0, b"\n")])
    assert out == b"[1] DONE 1\nDONE 0\n"
    assert lines == [(1, b"DONE 1\n"), (0, b"DONE 0\n")]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_any_interleaving_of_pieces_keeps_every_line_whole(order):
    pieces = {0: [b"LINE ", b"0 ", b"7", b"\nnext"], 1: [b"LI", b"NE 1", b" 7\n"], 2: [b"x\n", b"y", b"\n"],
              3: [b"\xff\xfe bad utf-8 ", b"\xc3", b"\xa9\n"]}
    writes = []
    queues = {w: list(p) for w, p in pieces.items()}
    for writer in itertools.chain.from_iterable(itertools.repeat(order, 4)):
        if queues[writer]:
            writes.append((writer, queues[writer].pop(0)))
    out, _ = run(writes)
    assert sorted(out.split(b"\n")) == sorted([b"LINE 0 7", b"next", b"[1] LINE 1 7", b"[2] x", b"[2] y",
                                               b"[3] \xff\xfe bad utf-8 \xc3\xa9", b""])


def test_redraws_go_out_at_once_and_are_not_lines():
    buffer = LineBuffer(redraws=True)
    assert [p.data for p in buffer.feed(b"\r 10%", 0)] == [b"\r"]
    assert [p.data for p in buffer.feed(b"\r 20%", 0)] == [b" 10%\r"]
    pieces = buffer.feed(b"\r100%\n", 0)
    assert [p.data for p in pieces] == [b" 20%\r100%\n"]
    assert pieces[0].line == b"\r 10%\r 20%\r100%\n"  # the whole line, for failure marks and tails


def test_a_final_carriage_return_waits_for_its_newline():
    buffer = LineBuffer(redraws=True)
    assert buffer.feed(b"text\r", 0) == []  # may be the first half of \r\n
    assert [(p.data, p.line) for p in buffer.feed(b"\n", 0)] == [(b"text\r\n", b"text\r\n")]


def test_other_ranks_carriage_returns_are_part_of_their_line():
    out, _ = run([(1, b"\rbar 1"), (0, b"zero\n"), (1, b"\rbar 2\n")])
    assert out == b"zero\n[1] \rbar 1\rbar 2\n"


def test_a_line_of_another_writer_starts_on_a_line_of_its_own_after_a_redraw():
    out, _ = run([(0, b"\rbar 1\rbar 2"), (1, b"one\n"), (0, b"\rbar 3\n")])
    assert out == b"\rbar 1\r\n[1] one\nbar 2\rbar 3\n"


def test_an_idle_partial_line_goes_out_as_it_is_and_its_rest_continues_it():
    out, _ = run([(1, b"Epoch 1 ..."), (1, b" done\n")], idle={1})
    assert out == b"[1] Epoch 1 ... done\n"


def test_an_idle_partial_line_cut_by_another_line_goes_on_with_its_prefix():
    out, lines = run([(1, b"Epoch 1 ..."), (2, b"two\n"), (1, b" done\n")], idle={1})
    assert out == b"[1] Epoch 1 ...\n[2] two\n[1]  done\n"
    assert (1, b"Epoch 1 ... done\n") in lines


def test_a_writer_that_dies_mid_line_gets_its_bytes_then_a_newline():
    out, lines = run([(0, b"half a li"), (1, b"and \xff half\n"), (1, b"cut")])
    assert out == b"[1] and \xff half\nhalf a li\n[1] cut\n"
    assert lines[-1] == (1, b"cut\n")


def test_a_redraw_left_open_at_the_end_gets_a_newline():
    out, _ = run([(0, b"\rbar 100%\r")])
    assert out == b"\rbar 100%\r\n"


def test_lines_longer_than_a_pipe_buffer_come_whole_between_other_lines():
    long_line = bytes(range(256)).replace(b"\n", b"") * 400  # 100 kB, every byte value but \n
    writes = []
    for start in range(0, len(long_line), 4096):
        writes += [(1, long_line[start:start + 4096]), (2, b"short\n")]
    writes.append((1, b"\n"))
    out, _ = run(writes)
    assert out.split(b"\n") == [b"[2] short"] * 25 + [b"[1] " + long_line, b""]


def test_a_line_beyond_max_pending_goes_out_in_pieces_without_loss():
    buffer = LineBuffer()
    pieces = buffer.feed(b"x" * (MAX_PENDING + 1), 0) + buffer.feed(b"yz\n", 0)
    assert b"".join(p.data for p in pieces) == b"x" * (MAX_PENDING + 1) + b"yz\n"
    assert pieces[-1].line.startswith(b"xxx")


def test_in_process_rank0_log_keeps_lines_whole_across_stdout_and_stderr(tmp_path):
    with tee_rank_log(str(tmp_path)):
        sys.stdout.write("DONE")
        sys.stderr.write("a warning\n")
        sys.stdout.write(" 0\n")
        sys.stdout.write("bad byte: " + b"\xff".decode("utf-8", "surrogateescape") + "\n")
        sys.stdout.write("no end")
    assert (tmp_path / "rank0.log").read_bytes() == b"a warning\nDONE 0\nbad byte: \xff\nno end\n"
