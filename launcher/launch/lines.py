"""Whole lines from several writers into shared outputs: the rule behind lmsrun's terminal stream and
its ``rank<R>.log`` files.

A writer (one rank's stdout, say) writes in pieces: ``print("DONE", 0)`` is four writes, a 100 kB line
arrives in pipe-sized chunks. ``LineBuffer`` keeps each writer's unfinished line and hands out whole
lines; ``LineSink`` is one output shared by writers, which puts each writer's line on a line of its
own with the writer's prefix. What is not a whole line still gets out:

- redraws: with ``redraws=True`` (rank 0, whose progress bar redraws with ``\\r``) every segment ended by
  ``\\r`` goes out at once, so a tqdm or rich bar stays live; it is not a line;
- a partial line longer than ``MAX_PENDING``, or idle for ``IDLE_FLUSH_S`` when its owner asks
  (a prompt or ``print(..., end="")`` before a long step, on a terminal), goes out as it is; the rest
  continues it unless another writer's line came in between, and then starts on a line of its own;
- at the end, a partial line goes out as written, then a newline.

Bytes are never decoded here: invalid UTF-8 passes through as written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Callable, Hashable, List, Optional

IDLE_FLUSH_S = 0.2  # a partial line unchanged this long is shown as it is
MAX_PENDING = 1 << 20  # a line longer than this goes out in pieces rather than fill memory
_LINE_KEPT = 1 << 16  # bytes of a line kept for reading it (failure marks, tails)


@dataclass
class Piece:
    """Bytes a writer's buffer lets out: a whole line (ends with ``\\n``), a redraw (ends with ``\\r``)
    or a partial line. ``line`` is the whole line (up to ``_LINE_KEPT`` bytes, earlier pieces included)
    when this piece ends one, else None."""

    data: bytes
    line: Optional[bytes] = None


class LineBuffer:
    """One writer's unfinished line."""

    def __init__(self, redraws: bool = False) -> None:
        self.redraws = redraws
        self.pending = bytearray()
        self.shown = bytearray()  # this line's bytes already let out (redraws, idle flushes)
        self.last_write = 0.0

    def feed(self, data: bytes, now: float) -> List[Piece]:
        """Take the writer's next bytes; returns the whole lines and redraws they complete."""
        self.last_write = now
        self.pending += data
        pieces: List[Piece] = []
        start = 0
        while True:
            end = self.pending.find(b"\n", start)
            if end < 0:
                break
            data_line = bytes(self.pending[start:end + 1])
            pieces.append(Piece(data_line, self._finish_line(data_line)))
            start = end + 1
        del self.pending[:start]
        if self.redraws:
            # the last \r that is not the final byte: a final \r may be the first half of \r\n
            redraw_end = self.pending.rfind(b"\r", 0, len(self.pending) - 1)
            if redraw_end >= 0:
                pieces.append(self._let_out(redraw_end + 1))
        if len(self.pending) > MAX_PENDING:
            pieces.append(self._let_out(len(self.pending)))
        return pieces

    def idle(self, now: float, idle_s: float = IDLE_FLUSH_S) -> Optional[Piece]:
        """The partial line as it is, when the writer has been quiet for ``idle_s``; else None."""
        if self.pending and now - self.last_write >= idle_s:
            return self._let_out(len(self.pending))
        return None

    def end(self) -> Optional[Piece]:
        """The writer is gone: its partial line, then a newline (None when it ended on a line end)."""
        if not self.pending:
            return None
        data = bytes(self.pending) + b"\n"
        self.pending.clear()
        return Piece(data, self._finish_line(data))

    def _let_out(self, size: int) -> Piece:
        data = bytes(self.pending[:size])
        del self.pending[:size]
        if len(self.shown) < _LINE_KEPT:
            self.shown += data[:_LINE_KEPT - len(self.shown)]
        return Piece(data)

    def _finish_line(self, data: bytes) -> bytes:
        line = bytes(self.shown) + data[:max(0, _LINE_KEPT - len(self.shown))] if self.shown else data
        self.shown.clear()
        return line


class LineSink:
    """One output written by several writers (a terminal stream, a rank's log): each writer's line starts
    on a line of its own, with that writer's prefix; a writer's partial line is continued by the same
    writer only."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.open_writer: Optional[Hashable] = None  # whose partial line the output ends with

    def put(self, writer: Hashable, data: bytes, prefix: bytes = b"") -> None:
        if not data:
            return
        head = b""
        if self.open_writer is not None and self.open_writer != writer:
            head = b"\n"  # another writer's unfinished line ends here; it starts afresh when it goes on
            self.open_writer = None
        if self.open_writer is None:
            head += prefix
        self.open_writer = None if data.endswith(b"\n") else writer
        self.write(head + data)

    def end_line(self) -> None:
        """End a partial line left open (the writers are gone): the bytes written, then a newline."""
        if self.open_writer is not None:
            self.open_writer = None
            self.write(b"\n")


def write_out(output: IO[bytes], data: bytes) -> None:
    """Write and flush; a closed reader (``lmsrun ... | head``) or a full disk must not stop the job."""
    try:
        output.write(data)
        output.flush()
    except (OSError, ValueError):
        pass
