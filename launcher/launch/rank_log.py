"""``rank0.log`` for a job that runs in lmsrun's own process (one rank, no mpirun): what the demux
writes for every rank of an mpirun job, written here by copying Python's stdout and stderr into
``<output_dir>/rank0.log``, by the demux's rule for logs (``launcher.launch.lines``): whole lines, so a partial
line on stdout is never cut by a line on stderr; ``\\r`` redraws at once; a partial line left at the end,
then a newline."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from typing import IO, Any, Dict, Iterator, Optional

from lmsdp.runtime import run_folder

from .lines import LineBuffer, LineSink, write_out


class _LogLines:
    """The log's side of both streams: one line buffer per stream into one file."""

    def __init__(self, log: IO[bytes]) -> None:
        self._log = log
        self._sink = LineSink(functools.partial(write_out, log))  # the log never stops the job
        self._buffers: Dict[str, LineBuffer] = {}
        self._lock = threading.Lock()

    def feed(self, stream: str, text: str) -> None:
        with self._lock:
            buffer = self._buffers.setdefault(stream, LineBuffer(redraws=True))
            for piece in buffer.feed(_encode(text), 0.0):
                self._sink.put(stream, piece.data)

    def end(self) -> None:
        with self._lock:
            for name, buffer in self._buffers.items():
                piece = buffer.end()
                if piece is not None:
                    self._sink.put(name, piece.data)
            self._sink.end_line()


class _Tee:
    """A text stream that writes to the terminal stream and to the log (the log never raises)."""

    def __init__(self, stream: Any, name: str, lines: _LogLines) -> None:
        self._stream, self._name, self._lines = stream, name, lines

    def write(self, text: str) -> int:
        self._lines.feed(self._name, text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer ... of the real stream
        return getattr(self._stream, name)


def _encode(text: str) -> bytes:
    """The bytes behind ``text``: bytes Python decoded with surrogateescape come back as they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "replace")


@contextlib.contextmanager
def tee_rank_log(output_dir: Optional[str], rank: int = 0) -> Iterator[None]:
    """While active, stdout and stderr also go to ``<output_dir>/rank<rank>.log`` (appended)."""
    if not output_dir:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(run_folder.rank_log(output_dir, rank), "ab") as log:
        lines = _LogLines(log)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, "stdout", lines), _Tee(sys.stderr, "stderr", lines)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            lines.end()
