"""``rank0.log`` for a job that runs in lmsrun's own process (one rank, no mpirun): what the demux
writes for every rank of an mpirun job, written here by copying Python's stdout and stderr into
``<output_dir>/rank0.log`` as they are printed."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any, Iterator, Optional
from lmsdp.runtime import run_folder


class _Tee:
    """A text stream that writes to the terminal stream and to the log (the log never raises)."""

    def __init__(self, stream: Any, log: IO[str]) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        try:
            self._log.write(text)
        except (OSError, ValueError):
            pass
        return self._stream.write(text)

    def flush(self) -> None:
        try:
            self._log.flush()
        except (OSError, ValueError):
            pass
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer ... of the real stream
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_rank_log(output_dir: Optional[str], rank: int = 0) -> Iterator[None]:
    """While active, stdout and stderr also go to ``<output_dir>/rank<rank>.log`` (appended)."""
    if not output_dir:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(run_folder.rank_log(output_dir, rank), "a", encoding="utf-8", errors="replace") as log:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
