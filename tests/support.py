"""What many test files share: the repository's paths, the ``lmsrun`` of this interpreter, an
environment whose PYTHONPATH reaches tests/scripts, and a real ``lmsrun`` child process with its
output collected line by line (``Run``) plus the check that no process of a job is left."""
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import psutil
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "scripts")
TINY = os.path.join(SCRIPTS, "tiny.yaml")
REPO_PATH = Path(REPO)
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
LMSRUN = os.path.join(os.path.dirname(sys.executable), "lmsrun")
ENV = {**os.environ, "PYTHONPATH": SCRIPTS + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}


class Run:
    """lmsrun as a child process; stdout/stderr lines collected with arrival times."""

    def __init__(self, *args: str, script: bool = False, env: dict = None) -> None:
        self.marker = "m" + uuid.uuid4().hex[:12]
        if script:  # the marker is an argument of the user's script
            args = args + ("--marker", self.marker)
        else:  # the job name: on every rank's command line as --set name=...
            args = args + ("--set", f"name={self.marker}")
        self.lines: list = []  # (time, stream, text)
        self.started = time.monotonic()
        self.started_epoch = time.time()  # processes older than this (e.g. a test Slurm cluster) are not ours
        self.proc = subprocess.Popen([LMSRUN, *args], cwd=REPO, env=env or ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                        for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name):
        for line in stream:
            self.lines.append((time.monotonic(), name, line.rstrip("\n")))

    def wait(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout=timeout)
        self.ended = time.monotonic()
        for reader in self.readers:
            reader.join(timeout=5)
        return code

    def text(self, stream: str = "") -> str:
        return "\n".join(t for _, s, t in self.lines if not stream or s == stream)

    def first_time(self, needle: str) -> float:
        for when, _, text in self.lines:
            if needle in text:
                return when
        raise AssertionError(f"{needle!r} not in output:\n{self.text()}")

    def wait_for(self, predicate, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"lmsrun ended early ({self.proc.returncode}):\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting:\n{self.text()}")


def metric_lines(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def assert_no_leftovers(run: Run) -> None:
    deadline = time.monotonic() + 5
    while True:
        children = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE and _born_after(p, run.started_epoch - 0.1)]
        marked = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and run.marker in " ".join(proc.info["cmdline"] or []):
                    marked.append(proc)
            except psutil.Error:
                pass
        if not children and not marked:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: children={children} marked={marked}")
        time.sleep(0.2)


def _born_after(proc: psutil.Process, epoch: float) -> bool:
    try:
        return proc.create_time() >= epoch
    except psutil.Error:
        return False


def rank_process(run: Run, rank: int) -> psutil.Process:
    """The process of ``rank`` among lmsrun's descendants (found by its Open MPI variables)."""
    for proc in psutil.Process(run.proc.pid).children(recursive=True):
        try:
            if proc.environ().get("OMPI_COMM_WORLD_RANK") == str(rank) and "python" in proc.name():
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"rank {rank} not found")
