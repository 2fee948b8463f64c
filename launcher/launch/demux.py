"""Split mpirun's tagged output by rank.

Open MPI tags every chunk a rank writes ``[job,rank]<stream>:`` (``--tag-output``; Hydra: ``[rank] ``),
so a line written in pieces (``print("DONE", 0)``: four writes) or longer than a pipe buffer arrives in
tagged chunks between other ranks' chunks. The demultiplexer puts each rank's lines back together
(``launcher.launch.lines``) and lets out whole lines only: rank 0's as they are, other ranks' with the prefix
``[R] ``; rank 0's ``\\r`` redraws go out at once (its progress bar stays live), and a partial line goes
out with a newline when the job ends or, on a terminal, as it is after ``idle_s`` of quiet. The same
lines go to ``rank<R>.log`` when an output folder is given. It also keeps each rank's last lines for the failure
report; mpirun's own lines are held back, and the runner decides whether to show them.
"""
from __future__ import annotations

import collections
import functools
import os
import re
import select
import threading
import time
from typing import IO, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from lmsdp.runtime import run_folder

from lmsdp.runtime.error_file import ErrorRecord, carried_record

from .lines import IDLE_FLUSH_S, LineBuffer, LineSink, Piece, write_out

FAIL_MARK = re.compile(r"^\[lmsdp\] rank (\d+) failed: (.*)$")
USER_ERROR = re.compile(r"^lmsrun: error: ")
OMPI_TAG = re.compile(rb"\[\d+,(\d+)\]<(stdout|stderr|stddiag)>:")
HYDRA_TAG = re.compile(rb"\[(\d+)\] ")
TAIL_LINES = 15


class Demux:
    """Splits mpirun's tagged output by rank; thread-safe across the stdout and stderr readers."""

    def __init__(self, flavor: str, output_dir: Optional[str], out: IO[bytes], err: IO[bytes],
                 verbose: bool = False, live: Sequence[str] = (), idle_s: float = IDLE_FLUSH_S) -> None:
        self.flavor = flavor
        self.verbose_own = verbose  # show mpirun's own lines as they come
        self.out, self.err = out, err
        self.output_dir = output_dir
        # streams on a terminal: a partial line quiet for idle_s goes out as it is (someone watches it);
        # into a pipe or file (CI, grep, a log shipper) and in rank logs every line waits to be whole
        self.live, self.idle_s = frozenset(live), idle_s
        self.lock = threading.Lock()
        self.screen: Dict[Tuple[int, str], LineBuffer] = {}
        self.logged: Dict[Tuple[int, str], LineBuffer] = {}  # the logs' own buffers of live streams
        out_sink = LineSink(functools.partial(write_out, out))
        # one screen (or one file, 2>&1) behind both: a line on stderr must not glue onto one on stdout
        self.sinks = {"stdout": out_sink, "stderr": out_sink if _same_file(out, err) else
                      LineSink(functools.partial(write_out, err))}
        self.logs: Dict[int, LineSink] = {}
        self.log_files: Dict[int, IO[bytes]] = {}
        self.tails: Dict[int, Deque[str]] = collections.defaultdict(lambda: collections.deque(maxlen=TAIL_LINES))
        self.own: List[str] = []  # mpirun's own lines
        self.user_errors: List[str] = []
        self.user_errors_shown: set = set()  # rank 0's lines are already on the screen
        self.marks: List[Tuple[int, str]] = []
        self.carried: List[ErrorRecord] = []  # error records of ranks on hosts that cannot see the error folder
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)

    # ---- per stream parsing

    def reader(self, stream: IO[bytes], name: str) -> threading.Thread:
        thread = threading.Thread(target=self._read, args=(stream, name), daemon=True, name=f"lmsrun-{name}")
        thread.start()
        return thread

    def _read(self, stream: IO[bytes], name: str) -> None:
        """Read one of mpirun's pipes to its end. Partial lines go out once the pipe has been empty for
        ``idle_s``: time is counted from when lmsrun read the bytes, so a busy lmsrun flushes nothing early."""
        fd = stream.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        buf = b""
        current: Optional[Tuple[int, str]] = None  # inside a tagged chunk of this (rank, stream)
        while True:
            wait = self.next_idle(name)
            if buf and current is not None:  # a rank's last bytes that might have begun a tag
                wait = self.idle_s if wait is None else min(wait, self.idle_s)
            if not poller.poll(None if wait is None else wait * 1000 + 1):
                if buf and current is not None:
                    self._rank(current, buf)
                    buf = b""
                self.flush_idle(name)
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                buf += data
            buf, current = self._parse(buf, current, name, final=not data)
            if not data:
                break
            if not poller.poll(0):  # the pipe is drained: ranks quiet for idle_s have nothing more in it
                self.flush_idle(name)
        self.end_stream(name)

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
            write_out(self.err, data)

    def _rank(self, source: Tuple[int, str], data: bytes) -> None:
        """A rank's bytes as they come: whole lines (and rank 0's redraws) go out now, the rest waits."""
        if not data:
            return
        now = time.monotonic()
        with self.lock:
            pieces = _buffer(self.screen, source).feed(data, now)
            if self.output_dir:  # a live stream's screen lets partial lines out early: the log has its own
                live = source[1] in self.live
                self._log(source, _buffer(self.logged, source).feed(data, now) if live else pieces)
            for piece in pieces:
                self._show(source, piece)

    def _show(self, source: Tuple[int, str], piece: Piece) -> None:
        rank, stream = source
        shown = True
        if piece.line is not None:
            shown = self._line(rank, piece.line, partly_shown=len(piece.line) > len(piece.data))
        if shown:
            self.sinks[stream].put(source, piece.data, b"" if rank == 0 else f"[{rank}] ".encode())

    def _log(self, source: Tuple[int, str], pieces: Iterable[Optional[Piece]]) -> None:
        log = self.rank_log(source[0])
        for piece in pieces:
            if log is not None and piece is not None:
                log.put(source[1], piece.data)

    def _line(self, rank: int, raw: bytes, partly_shown: bool) -> bool:
        """Read a whole line of a rank (failure marks, user errors, tails); False: keep it off the screen."""
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        visible = text.rsplit("\r", 1)[-1]
        record = carried_record(visible)
        if record is not None:  # for lmsrun, not the screen
            self.carried.append(record)
            return False
        if USER_ERROR.match(visible):
            if visible not in self.user_errors:
                self.user_errors.append(visible)
            if rank == 0 or partly_shown:
                self.user_errors_shown.add(visible)
                return True
            return False  # lmsrun reports it once, whichever ranks said it
        mark = FAIL_MARK.match(visible)
        if mark:
            self.marks.append((int(mark.group(1)), mark.group(2)))
        if visible.strip():
            self.tails[rank].append(visible)
        return True

    def rank_log(self, rank: int) -> Optional[LineSink]:
        """``rank<R>.log`` of ``rank`` (opened on first use), or None without an output folder."""
        if not self.output_dir:
            return None
        if rank not in self.logs:
            handle = open(run_folder.rank_log(self.output_dir, rank), "ab")
            self.log_files[rank] = handle
            self.logs[rank] = LineSink(functools.partial(write_out, handle))
        return self.logs[rank]

    def flush_idle(self, stream: str) -> None:
        """On a terminal: let out the partial lines of ``stream``'s ranks quiet for ``idle_s``."""
        if stream not in self.live:
            return
        now = time.monotonic()
        with self.lock:
            for source, buffer in self.screen.items():
                piece = buffer.idle(now, self.idle_s) if source[1] == stream else None
                if piece is not None:
                    self._show(source, piece)

    def next_idle(self, stream: str) -> Optional[float]:
        """Seconds until a partial line of ``stream`` is due to go out (None: nothing will be)."""
        if stream not in self.live:
            return None
        with self.lock:
            due = [b.last_write + self.idle_s for (_, s), b in self.screen.items() if s == stream and b.pending]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def end_stream(self, stream: Optional[str] = None) -> None:
        """The writers of ``stream`` (None: all) are gone: partial lines go out, then a newline."""
        with self.lock:
            for source, buffer in self.screen.items():
                if stream is None or source[1] == stream:
                    piece = buffer.end()
                    logged = self.logged[source].end() if source in self.logged else piece
                    self._log(source, [logged])
                    if piece is not None:
                        self._show(source, piece)
            if stream is None:
                for sink in [*self.sinks.values(), *self.logs.values()]:
                    sink.end_line()

    def flush_partials(self) -> None:
        """At the job's end: every partial line out, every output ending on a line end."""
        self.end_stream(None)

    def close(self) -> None:
        with self.lock:
            for handle in self.log_files.values():
                handle.close()
            self.log_files.clear()
            self.logs.clear()


def _buffer(buffers: Dict[Tuple[int, str], LineBuffer], source: Tuple[int, str]) -> LineBuffer:
    """The line buffer of ``source`` (made on first use): rank 0's redraws go out at once."""
    buffer = buffers.get(source)
    if buffer is None:
        buffer = buffers[source] = LineBuffer(redraws=source[0] == 0)
    return buffer


def _same_file(out: IO[bytes], err: IO[bytes]) -> bool:
    """True when both outputs lead to the same file, pipe or terminal."""
    try:
        return os.path.samestat(os.fstat(out.fileno()), os.fstat(err.fileno()))
    except (OSError, ValueError, AttributeError):
        return out is err


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


