"""The disk tier's mechanism: one rank's spill folder, a pool of writer/reader threads, spill files.

Each spilled tensor is one file in ``<disk_dir>/rank<R>-<host>-pid<P>/``, written by a worker thread in large
chunks (``CHUNK``), with ``O_DIRECT`` where the file system takes it and the buffer and length are
aligned (page-aligned pinned buffers, size classes that are multiples of 4 KiB), else buffered with
``posix_fadvise`` (sequential, then drop the pages: a spill file is read once). A read waits for its
file's write and checks the size (and a CRC32 with ``verify``). Errors (a full disk, an I/O error, a
corrupted file) are one line naming the folder and the tier (:class:`DiskTierError`), raised on the
compute thread at the next spill or read, never wrong data; the folder's files go then (a full disk is
not left full). The folder goes at ``close()`` (and at exit); a killed job's folder (its pid gone) is
removed by the next start in the same ``disk_dir``.
"""
from __future__ import annotations

import atexit
import errno
import os
import queue
import re
import shutil
import socket
import threading
import time
import zlib
from typing import Callable, List, Optional

import torch

from lmsdp.runtime.errors import UserError
from lmsdp.runtime.processes import pid_alive

from .units import format_size

CHUNK = 8 << 20      # bytes per write/read call
ALIGN = 4096         # O_DIRECT alignment of address, length and offset
_FOLDER = re.compile(r"^rank\d+-(.+)-pid(\d+)$")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")


class DiskTierError(UserError):
    """The disk tier cannot hold or give back a tensor: full, an I/O error, a failed check (one line)."""


def _rank() -> int:
    for name in _RANK_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def folder_name(rank: int) -> str:
    """This process's spill folder name: rank, host and pid (a shared ``disk_dir`` never mixes hosts up)."""
    return f"rank{rank}-{socket.gethostname()}-pid{os.getpid()}"


def clear_stale(root: str) -> List[str]:
    """Remove spill folders in ``root`` of this host whose process is gone (a killed job's); returns
    their paths. Another host's folders are left alone: its pids mean nothing here."""
    removed = []
    host = socket.gethostname()
    for name in os.listdir(root):
        m = _FOLDER.match(name)
        path = os.path.join(root, name)
        if (m and m.group(1) == host and not os.path.islink(path) and os.path.isdir(path)
                and not pid_alive(int(m.group(2)))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _aligned(buf: torch.Tensor, length: int) -> bool:
    return buf.data_ptr() % ALIGN == 0 and length <= buf.numel()


class Spill:
    """One spilled tensor: its file, the write's and the read's completion, and its check."""

    __slots__ = ("path", "nbytes", "crc", "written", "read_done", "read_buf", "error", "claim", "dropped")

    def __init__(self, path: str, nbytes: int) -> None:
        self.path, self.nbytes = path, nbytes
        self.crc: Optional[int] = None
        self.written = threading.Event()
        self.read_done: Optional[threading.Event] = None
        self.read_buf: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.claim = threading.Lock()   # held by whichever thread runs the read
        self.dropped = False


class DiskTier:
    """One rank's spill folder and its worker threads (``workers`` writers/readers, FIFO)."""

    def __init__(self, root: str, limit: Optional[int], verify: bool, workers: int = 2) -> None:
        self.root, self.limit, self.verify = os.path.abspath(root), limit, verify
        try:
            os.makedirs(self.root, exist_ok=True)
            self.stale_removed = clear_stale(self.root)
            self.folder = os.path.join(self.root, folder_name(_rank()))
            shutil.rmtree(self.folder, ignore_errors=True)
            os.mkdir(self.folder, 0o700)
        except OSError as exc:
            raise DiskTierError(f"swap.disk_dir: cannot use {self.root} for the disk tier: {exc.strerror or exc}; "
                                "allowed: a writable local folder") from None
        self.direct = self._direct_ok()
        self.used_bytes = self.peak_bytes = 0
        self.write_bytes = self.read_bytes = 0
        self.write_s = self.read_s = 0.0
        self.failure: Optional[DiskTierError] = None
        self._lock = threading.Lock()
        self._seq = 0
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"lmsdp-disk-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()
        atexit.register(self.remove_folder)

    def _direct_ok(self) -> bool:
        """Does this file system take O_DIRECT (tmpfs does not)?"""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        probe = os.path.join(self.folder, ".direct")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o600)
            os.close(fd)
            return True
        except OSError:
            return False
        finally:
            with _quiet():
                os.unlink(probe)

    # ------------------------------------------------------------------------------ compute side
    def check(self) -> None:
        """Raise a worker's failure on the compute thread (the first one)."""
        if self.failure is not None:
            self._give_up(self.failure)

    def _give_up(self, err: DiskTierError) -> None:
        """The tier cannot go on: its files go now (a full disk is not left full), then ``err`` is raised."""
        self.failure = self.failure or err
        self.remove_folder()
        raise err

    def spill(self, buf: torch.Tensor, nbytes: int, ready: Callable[[], None], done: Callable[[], None]) -> Spill:
        """Write ``buf[:nbytes]`` to a new file once ``ready()`` returns (its device->host copy);
        ``done()`` runs after the write (the staging buffer goes back)."""
        self.check()
        with self._lock:
            if self.limit is not None and self.used_bytes + nbytes > self.limit:
                self._give_up(DiskTierError(
                    f"swap.disk_limit: the disk tier in {self.folder} needs {format_size(nbytes)} more, limit "
                    f"{format_size(self.limit)} with {format_size(self.used_bytes)} spilled; raise swap.disk_limit "
                    "or swap.host_limit, or lower the batch size"))
            self.used_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            self._seq += 1
            sp = Spill(os.path.join(self.folder, f"t{self._seq}.bin"), nbytes)
        self._q.put(lambda: self._write(sp, buf, ready, done))
        return sp

    def read_ahead(self, sp: Spill, buf: torch.Tensor) -> None:
        """Start reading ``sp`` into ``buf`` on a worker (disk -> host ahead of need)."""
        sp.read_buf, sp.read_done = buf, threading.Event()
        self._q.put(lambda: self._read(sp))

    def fetch(self, sp: Spill) -> torch.Tensor:
        """The host buffer holding ``sp``'s bytes (read here if no worker has started): blocks until then."""
        assert sp.read_done is not None and sp.read_buf is not None
        self._read(sp)
        sp.read_done.wait()
        if sp.error is not None:
            self._give_up(sp.error)  # type: ignore[arg-type]
        return sp.read_buf

    def drop(self, sp: Spill, done: Callable[[], None]) -> None:
        """``sp`` is no longer needed: its file goes once its write and read are over (on a worker),
        then ``done()`` runs (a read-ahead buffer nobody took goes back)."""
        sp.dropped = True
        self._q.put(lambda: self._unlink(sp, done))

    # ------------------------------------------------------------------------------- worker side
    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            job()
            del job

    def _fail(self, sp: Spill, exc: BaseException, what: str) -> None:
        if isinstance(exc, DiskTierError):
            err = exc
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            err = DiskTierError(f"swap.disk_dir: the disk tier in {self.folder} is full ({exc.strerror}) {what} "
                                f"{format_size(sp.nbytes)}; free space there, point swap.disk_dir elsewhere, "
                                "set swap.disk_limit below the free space, or raise swap.host_limit")
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            err = DiskTierError(f"swap.disk_dir: I/O error in the disk tier in {self.folder} ({reason}) {what} "
                                f"{os.path.basename(sp.path)}; check the disk or point swap.disk_dir elsewhere")
        sp.error = err
        if self.failure is None:
            self.failure = err

    def _open(self, path: str, flags: int, direct: bool) -> int:
        if direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(path, flags, 0o600)

    def _write(self, sp: Spill, buf: torch.Tensor, ready: Callable[[], None], done: Callable[[], None]) -> None:
        try:
            ready()
            t0 = time.perf_counter()
            length = -(-sp.nbytes // ALIGN) * ALIGN
            direct = self.direct and _aligned(buf, length)
            view = memoryview(buf.numpy())[:length if direct else sp.nbytes]
            if self.verify:
                sp.crc = zlib.crc32(view[:sp.nbytes])
            fd = self._open(sp.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct)
            try:
                with _quiet(errno.EOPNOTSUPP, errno.EINVAL):  # one extent (reads stay sequential), ENOSPC up front
                    os.posix_fallocate(fd, 0, len(view))
                _pwrite_all(fd, view)
                if length != sp.nbytes and direct:
                    os.ftruncate(fd, sp.nbytes)
                if not direct:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            with self._lock:
                self.write_bytes += sp.nbytes
                self.write_s += time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - named on the compute thread
            self._fail(sp, exc, "writing")
        finally:
            sp.written.set()
            done()

    def _read(self, sp: Spill) -> None:
        if not sp.claim.acquire(blocking=False):
            return
        assert sp.read_done is not None and sp.read_buf is not None
        try:
            sp.written.wait()
            if sp.error is not None:
                return
            t0 = time.perf_counter()
            length = -(-sp.nbytes // ALIGN) * ALIGN
            direct = self.direct and _aligned(sp.read_buf, length)
            fd = self._open(sp.path, os.O_RDONLY, direct)
            try:
                size = os.fstat(fd).st_size
                if size != sp.nbytes:
                    raise DiskTierError(f"swap.disk_dir: spilled tensor file {sp.path} (disk tier) has {size} bytes, "
                                        f"expected {sp.nbytes}: it was changed or cut short; the step cannot go on")
                view = memoryview(sp.read_buf.numpy())[:length if direct else sp.nbytes]
                _pread_all(fd, view, sp.nbytes)
                if not direct:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            if sp.crc is not None and zlib.crc32(view[:sp.nbytes]) != sp.crc:
                raise DiskTierError(f"swap.verify: spilled tensor file {sp.path} (disk tier) failed its CRC32 check: "
                                    "the disk or something else changed it; the step cannot go on")
            with self._lock:
                self.read_bytes += sp.nbytes
                self.read_s += time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - named on the compute thread
            self._fail(sp, exc, "reading")
        finally:
            sp.read_done.set()

    def _unlink(self, sp: Spill, done: Callable[[], None]) -> None:
        sp.written.wait()
        if sp.read_done is not None:
            self._read(sp)  # a read-ahead nobody took: run (or wait for) it so its buffer is free
            sp.read_done.wait()
        with _quiet():
            os.unlink(sp.path)
        with self._lock:
            self.used_bytes -= sp.nbytes
        done()

    def take(self) -> tuple:
        """(bytes written, write s, bytes read, read s) since the last call: one step's figures."""
        with self._lock:
            out = (self.write_bytes, self.write_s, self.read_bytes, self.read_s)
            self.write_bytes = self.read_bytes = 0
            self.write_s = self.read_s = 0.0
        return out

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self.remove_folder()

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _pwrite_all(fd: int, view: memoryview) -> None:
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:off + CHUNK], off)


def _pread_all(fd: int, view: memoryview, nbytes: int) -> None:
    off = 0
    while off < nbytes:
        n = os.preadv(fd, [view[off:off + CHUNK]], off)
        if n <= 0:
            raise OSError(errno.EIO, "short read")
        off += n


class _quiet:
    """``with _quiet():`` ignores OSError (cleanup of files that may be gone); ``_quiet(errno, ...)``
    only those errnos."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = errnos

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return (kind is not None and issubclass(kind, OSError)  # type: ignore[arg-type]
                and (not self.errnos or getattr(exc, "errno", None) in self.errnos))
