"""Atomic, verified checkpoints: written to a temp file, fsynced, renamed; a damaged file is never
loaded -- the newest one that verifies and loads wins, and each skipped file is one warning line.

Integrity: ``torch.load`` does not check the zip CRCs, so zeroed bytes inside a tensor load silently.
Each save hashes the bytes as they are written and puts the SHA-256 next to the file
(``step-N.pt.sha256``, renamed into place before the checkpoint itself); loading checks it first.
A checkpoint without one (older, or copied in by hand) is checked against its zip CRCs instead.

Loading never runs code (launcher/train/checkpoint_trust.py): states are made plain data before they are
written, and read with ``torch.load(weights_only=True)``; a file that needs more is refused with one
line, like a damaged one, and the next older checkpoint is used.

Failures to write (full disk, read-only folder) are one line naming the path and the cause
(``CheckpointWriteError``), and ``preflight`` finds them before training rather than at the first save.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import torch

from lmsdp.launcher.config.errors import UserError
from lmsdp.runtime.new_file import current_umask, open_new

from .checkpoint_trust import UnsafeCheckpoint, load_weights_only, make_plain

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
DIGEST_SUFFIX = ".sha256"
TMP_PREFIX = ".tmp-"
CHUNK = 8 << 20


class CheckpointWriteError(UserError):
    """A checkpoint cannot be written: one line naming the path and the cause."""


class _HashingWriter:
    """File-like for ``torch.save``: hashes what passes through and keeps the OS error, which torch
    would otherwise replace by ``enforce fail at inline_container.cc: unexpected pos``."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            written = self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str) -> None:
    """Raise ValueError when ``path`` is not byte-for-byte what was saved (SHA-256 from save time,
    or the zip CRCs of every record when there is no digest file)."""
    digest_path = path + DIGEST_SUFFIX
    if os.path.exists(digest_path):
        with open(digest_path, encoding="ascii", errors="replace") as handle:
            words = handle.read().split()
        expected = words[0] if words else ""
        if file_digest(path) != expected:
            raise ValueError("SHA-256 does not match the one written at save time")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"not a readable checkpoint archive: {_cause(exc)}") from None
    if bad is not None:
        raise ValueError(f"CRC mismatch in record {bad}")


@dataclass
class CheckpointManager:
    directory: str
    keep: int = 3
    announce: bool = True  # print the warning for a skipped checkpoint (rank 0 only, in a job)

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}.pt")

    def save(self, step: int, state: Dict[str, Any]) -> str:
        """Write ``state`` (tensors and plain data only: NotPlainData otherwise) for ``step`` atomically
        with its digest and prune old checkpoints; returns the path. A write that fails raises
        CheckpointWriteError (path and cause, one line)."""
        final = self.write(self.path_for(step), make_plain(state))
        self._prune()
        return final

    def write(self, final: str, state: Dict[str, Any]) -> str:
        """``state`` to ``final`` (in this manager's folder) and its digest next to it, atomically."""
        tmp = tmp_digest = None
        writer: Optional[_HashingWriter] = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=self.directory)
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would ignore the user's umask
            with os.fdopen(fd, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(state, writer)
                handle.flush()
                os.fsync(handle.fileno())
            tmp_digest = tmp + DIGEST_SUFFIX
            with open_new(tmp_digest) as handle:  # a predictable name: never through a planted link
                handle.write(f"{writer.digest.hexdigest()}  {os.path.basename(final)}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_digest, final + DIGEST_SUFFIX)
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except (OSError, RuntimeError) as exc:
            self._discard(tmp, tmp_digest)
            cause = writer.error if writer is not None and writer.error is not None else exc
            if isinstance(exc, RuntimeError) and cause is exc and _disk_full(self.directory):
                cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise CheckpointWriteError(f"checkpoint: cannot write {final}: {_cause(cause)}") from None
        except BaseException:
            self._discard(tmp, tmp_digest)
            raise
        return final

    @staticmethod
    def _discard(*paths: Optional[str]) -> None:
        for path in paths:
            if path and os.path.exists(path):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def clean_partial(self) -> List[str]:
        """Remove temp files of saves that were killed mid-write, and digests whose checkpoint is
        gone (call while holding the folder's lock: no live writer then); returns what was removed."""
        if not os.path.isdir(self.directory):
            return []
        removed = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            orphan = name.endswith(DIGEST_SUFFIX) and not os.path.exists(path[: -len(DIGEST_SUFFIX)])
            if name.startswith(TMP_PREFIX) or orphan:
                try:
                    if os.path.isdir(path) and not os.path.islink(path):  # a sharded save's .tmp-step-N/
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass
        return removed

    def preflight(self, expected_bytes: int = 0) -> None:
        """Before training: the folder can be created and written, and has room for one more
        checkpoint (the newest one's size, else ``expected_bytes``); CheckpointWriteError if not."""
        self.check_writable()
        self.check_space(expected_bytes)

    def check_writable(self) -> None:
        """The folder can be created and a file written into it; CheckpointWriteError if not."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=self.directory)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise CheckpointWriteError(f"checkpoint: cannot write to {self.directory}: {_cause(exc)}",
                                       hint="set train.checkpoint_dir (or --output-dir) to a writable folder") from None

    def check_space(self, expected_bytes: int = 0) -> None:
        """Room for one more checkpoint: the newest one's size, else ``expected_bytes``."""
        newest = self.candidates()[:1]
        needed = os.path.getsize(newest[0][1]) if newest else expected_bytes
        free = shutil.disk_usage(self.directory).free
        if needed and free < needed:
            raise CheckpointWriteError(
                f"checkpoint: {self.directory} has {_mib(free)} free, a checkpoint needs about {_mib(needed)}",
                hint="free some space or set train.checkpoint_dir to another disk")

    def candidates(self) -> List[Tuple[int, str]]:
        """(step, path) of finished checkpoints, newest first (temp files are never candidates)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.directory, name)))
        return sorted(found, reverse=True)

    def load_latest(self, map_location: Any = "cpu") -> Optional[Tuple[str, Dict[str, Any]]]:
        """Newest checkpoint that verifies, loads and has the expected keys; damaged ones are skipped
        with one warning line each."""
        for _, path in self.candidates():
            try:
                verify(path)
                state = load_weights_only(path, path, map_location)
                if not isinstance(state, dict) or "step" not in state or "model" not in state:
                    raise ValueError("not an lmsdp checkpoint (missing 'step'/'model')")
            except Exception as exc:  # noqa: BLE001 - any failure means: do not trust this file
                if self.announce:
                    print(skip_line(path, exc), file=sys.stderr, flush=True)
                continue
            return path, state
        return None

    def _prune(self) -> None:
        for _, path in self.candidates()[self.keep:]:
            for victim in (path, path + DIGEST_SUFFIX):
                try:
                    os.unlink(victim)
                except FileNotFoundError:
                    pass


def skip_line(path: str, exc: BaseException) -> str:
    """The one warning line for a checkpoint ``--resume`` passes over: refused (it would run code) or damaged."""
    if isinstance(exc, UnsafeCheckpoint):
        return f"[lmsdp] warning: checkpoint {exc.args[0]}; trying an older one (hint: {exc.hint})"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"[lmsdp] warning: checkpoint {path} is damaged or incomplete ({reason}); trying an older one"


def _disk_full(directory: str) -> bool:
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
