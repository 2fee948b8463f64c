"""Atomic checkpoints: written to a temp file, fsynced, renamed; a damaged file is never loaded —
the newest one that loads wins, and each skipped file is reported."""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

_NAME = re.compile(r"^step-(\d{8,})\.pt$")


@dataclass
class CheckpointManager:
    directory: str
    keep: int = 3

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}.pt")

    def save(self, step: int, state: Dict[str, Any]) -> str:
        """Write ``state`` for ``step`` atomically and prune old checkpoints; returns the path."""
        os.makedirs(self.directory, exist_ok=True)
        final = self.path_for(step)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._prune()
        return final

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
        """Newest checkpoint that loads and has the expected keys; damaged ones are skipped with a warning."""
        for _, path in self.candidates():
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
                if not isinstance(state, dict) or "step" not in state or "model" not in state:
                    raise ValueError("not an lmsdp checkpoint (missing 'step'/'model')")
            except Exception as exc:  # noqa: BLE001 - any failure means: do not trust this file
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"[lmsdp] warning: checkpoint {path} is damaged or incomplete ({reason}); "
                      "trying an older one", file=sys.stderr)
                continue
            return path, state
        return None

    def _prune(self) -> None:
        for _, path in self.candidates()[self.keep:]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
