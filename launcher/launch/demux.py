"""Split mpirun's tagged output by rank.

Open MPI tags every chunk ``[job,rank]<stream>:`` (``--tag-output``; Hydra: ``[rank] ``). The
demultiplexer passes rank 0's bytes through unchanged (its progress bar redraws with \\r), prefixes
other ranks' lines with ``[R] ``, copies everything to ``rank<R>.log`` when an output folder is given,
and keeps each rank's last lines for the failure report. mpirun's own lines are held back; the runner
decides whether to show them.
"""
from __future__ import annotations

import collections
import os
import re
import threading
from typing import IO, Deque, Dict, List, Optional, Tuple
from lmsdp.runtime import run_folder

FAIL_MARK = re.compile(r"^\[lmsdp\] rank (\d+) failed: (.*)$")
USER_ERROR = re.compile(r"^lmsrun: error: ")
OMPI_TAG = re.compile(rb"\[\d+,(\d+)\]<(stdout|stderr|stddiag)>:")
HYDRA_TAG = re.compile(rb"\[(\d+)\] ")
TAIL_LINES = 15


class Demux:
    """Splits mpirun's tagged output by rank; thread-safe across the stdout and stderr readers."""

    def __init__(self, flavor: str, output_dir: Optional[str], out: IO[bytes], err: IO[bytes],
                 verbose: bool = False) -> None:
        self.flavor = flavor
        self.verbose_own = verbose  # show mpirun's own lines as they come
        self.out, self.err = out, err
        self.output_dir = output_dir
        self.lock = threading.Lock()
        self.logs: Dict[int, IO[bytes]] = {}
        self.partial: Dict[Tuple[int, str], bytearray] = collections.defaultdict(bytearray)
        self.tails: Dict[int, Deque[str]] = collections.defaultdict(lambda: collections.deque(maxlen=TAIL_LINES))
        self.own: List[str] = []  # mpirun's own lines
        self.user_errors: List[str] = []
        self.user_errors_shown: set = set()  # rank 0's lines are already on the screen
        self.marks: List[Tuple[int, str]] = []
        self.open_line: Dict[str, bool] = {"stdout": False, "stderr": False}  # rank 0 stopped mid-line
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)

    # ---- per stream parsing

    def reader(self, stream: IO[bytes], name: str) -> threading.Thread:
        thread = threading.Thread(target=self._read, args=(stream, name), daemon=True, name=f"lmsrun-{name}")
        thread.start()
        return thread

    def _read(self, stream: IO[bytes], name: str) -> None:
        fd = stream.fileno()
        buf = b""
        current: Optional[Tuple[int, str]] = None  # inside a tagged chunk of this (rank, stream)
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                buf += data
            buf, current = self._parse(buf, current, name, final=not data)
            if not data:
                break
        self.flush_partials()

    def _parse(self, buf: bytes, current: Optional[Tuple[int, str]], name: str,
               final: bool) -> Tuple[bytes, Optional[Tuple[int, str]]]:
        tag_re = OMPI_TAG if self.flavor == "openmpi" else HYDRA_TAG
        while buf:
            if current is None:
                match = tag_re.match(buf)
                if match:
                    stream = match.group(2).decode() if self.flavor == "openmpi" else name
                    current = (int(match.group(1)), "stdout" if stream == "stdout" else "stderr")
                    buf = buf[match.end():]
                    continue
                if not final and _maybe_tag_prefix(buf):
                    return buf, None  # wait for the rest of a tag split across reads
                end = buf.find(b"\n")
                if end < 0:
                    if not final:
                        return buf, None
                    end = len(buf) - 1
                self._own(buf[:end + 1])
                buf = buf[end + 1:]
                continue
            # inside a rank's chunk: runs to its newline or to the next tag
            newline = buf.find(b"\n")
            match = tag_re.search(buf, 0, newline if newline >= 0 else len(buf)) if self.flavor == "openmpi" else None
            if match:
                self._rank(current, buf[:match.start()])
                buf, current = buf[match.start():], None
            elif newline >= 0:
                self._rank(current, buf[:newline + 1])
                buf, current = buf[newline + 1:], None
            else:
                keep = _tag_prefix_len(buf) if not final else 0
                self._rank(current, buf[:len(buf) - keep])
                return buf[len(buf) - keep:], current
        return buf, current

    # ---- sinks

    def _own(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").rstrip("\r\n")
        with self.lock:
            self.own.append(text)
        if self.verbose_own:
            _write(self.err, data)

    def _rank(self, source: Tuple[int, str], data: bytes) -> None:
        if not data:
            return
        rank, stream = source
        with self.lock:
            log = self.open_log(rank)
            if log is not None:
                log.write(data)
                log.flush()
            pending = self.partial[source]
            pending += data
            lines = pending.split(b"\n")
            self.partial[source] = bytearray(lines.pop())
            for raw in lines:
                self._line(rank, stream, raw)
            if rank == 0:  # pass through as it comes: keeps the progress bar live
                _write(self.out if stream == "stdout" else self.err, data)
                self.open_line[stream] = not data.endswith((b"\n", b"\r"))

    def _line(self, rank: int, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        visible = text.rsplit("\r", 1)[-1]
        if USER_ERROR.match(visible):
            if visible not in self.user_errors:
                self.user_errors.append(visible)
            if rank == 0:
                self.user_errors_shown.add(visible)
            return
        mark = FAIL_MARK.match(visible)
        if mark:
            self.marks.append((int(mark.group(1)), mark.group(2)))
        if visible.strip():
            self.tails[rank].append(visible)
        if rank != 0:
            # a line of another rank never glues onto a line rank 0 has not finished yet
            start = "\n" if self.open_line[stream] else ""
            self.open_line[stream] = False
            _write(self.out if stream == "stdout" else self.err, f"{start}[{rank}] {text}\n".encode("utf-8", "replace"))

    def open_log(self, rank: int) -> Optional[IO[bytes]]:
        if not self.output_dir:
            return None
        if rank not in self.logs:
            self.logs[rank] = open(run_folder.rank_log(self.output_dir, rank), "ab")
        return self.logs[rank]

    def flush_partials(self) -> None:
        with self.lock:
            for (rank, stream), pending in list(self.partial.items()):
                if pending:
                    self.partial[(rank, stream)] = bytearray()
                    if rank != 0:
                        self._line(rank, stream, bytes(pending))
                    else:
                        visible = pending.decode("utf-8", "replace").rsplit("\r", 1)[-1]
                        if visible.strip():
                            self.tails[0].append(visible)

    def close(self) -> None:
        with self.lock:
            for log in self.logs.values():
                log.close()
            self.logs.clear()


def _write(sink: IO[bytes], data: bytes) -> None:
    """Write and flush; a closed reader (``lmsrun ... | head``) must not stop the job's draining."""
    try:
        sink.write(data)
        sink.flush()
    except (OSError, ValueError):
        pass


def _maybe_tag_prefix(buf: bytes) -> bool:
    """True when ``buf`` could be the start of a tag that the next read completes."""
    return len(buf) < 40 and b"\n" not in buf and buf.startswith(b"[") and re.fullmatch(
        rb"\[[\d,]*(\][<a-z]*>?)?", buf) is not None


def _tag_prefix_len(buf: bytes) -> int:
    """Length of a trailing partial tag ('[1,0]<std') to hold back until the next read."""
    start = buf.rfind(b"[", max(0, len(buf) - 40))
    if start < 0:
        return 0
    return len(buf) - start if _maybe_tag_prefix(buf[start:]) else 0


