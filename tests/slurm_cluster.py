"""A real Slurm cluster on this machine (slurmctld + slurmd, auth/none) in a temp dir, for tests.

Follows the tested recipe in the shared DESIGN.md: config, state, spool, logs and PIDs under the temp
dir; daemons started with setsid in the foreground mode (-D) so their PIDs are ours to wait on; ports
picked free so two test runs never meet. ``SlurmCluster.start()`` raises ``ClusterUnavailable`` with the
reason when the cluster cannot be had (not root, binaries missing, daemons do not come up).

``nodes=1`` (the session fixture) is the single-node cluster of the recipe. ``nodes=N`` starts N
slurmd daemons on this host (``slurmd -N n1`` ...; each with its own port, spool, TmpFS and log through
Slurm's %n), which Slurm treats as N nodes: enough to run the multi-node templates for real.

Use from pytest through the ``slurm_cluster`` fixture (tests/test_slurm_cluster.py and friends import it),
or by hand: ``python tests/slurm_cluster.py`` starts one, prints SLURM_CONF and waits for Ctrl-C or a TERM
(either stops the daemons).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import pytest

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(RuntimeError):
    """The local cluster cannot be started here (the message says why)."""


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 0, read back, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> Optional[str]:
    """``name`` on PATH or in the sbin folders Debian installs daemons into."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)), None)


@dataclass
class Job:
    """What ``scontrol show job`` says about one job (the fields the tests use)."""

    job_id: str
    state: str
    exit_code: str
    restarts: int
    fields: Dict[str, str]


@dataclass
class SlurmCluster:
    """One slurmctld + ``nodes`` slurmd on this machine, configured under ``root``."""

    root: str
    nodes: int = 1
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ctld_port: int = 0
    slurmd_ports: List[int] = field(default_factory=list)
    # job ids name per-step files (e.g. the PMIx server's); distinct ranges keep concurrent clusters apart
    first_job_id: int = field(default_factory=lambda: 1000 + (os.getpid() % 5000) * 100)
    procs: List[subprocess.Popen] = field(default_factory=list)
    # namespace hosts (tests/netns_cluster.py): one slurmd in each, slurmctld on the bridge address
    hosts: Optional[Any] = None

    @property
    def node_names(self) -> List[str]:
        if self.hosts is not None:
            return [h.name for h in self.hosts.hosts]
        return [self.node] if self.nodes == 1 else [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def ctld_address(self) -> str:
        return self.hosts.bridge_address if self.hosts is not None else "127.0.0.1"

    def node_line(self, name: str, port: int) -> str:
        if self.hosts is not None:
            host = self.hosts.host(name)
            return f"NodeName={name} NodeHostname={name} NodeAddr={host.address} Port={port} "
        return f"NodeName={name} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={port} "

    def slurmd_argv(self, name: str) -> List[str]:
        """slurmd for node ``name``; on a namespace host inside its network, hostname and /tmp
        (``nsenter --net`` rather than ``ip netns exec``, which remounts /sys and hides the cgroups)."""
        argv = [find_binary("slurmd") or "slurmd", "-D", "-N", name, "-f", self.conf]
        if self.hosts is None:
            return argv
        host = self.hosts.host(name)
        return ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", f"hostname {name} && mount --bind {host.tmp} /tmp && exec {' '.join(argv)}"]

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    @property
    def env(self) -> Dict[str, str]:
        """Environment for client commands (and the jobs they submit): SLURM_CONF points here."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                env.pop(key)  # never inherit an outer allocation
        return env

    # ----------------------------------------------------------------------------------------
    def write_config(self) -> None:
        names = self.node_names
        subs = ["state", "log"] + ([f"spool-{n}" for n in names] + [f"tmpfs-{n}" for n in names])
        for sub in subs:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        used = {self.ctld_port} if self.ctld_port else set()
        self.ctld_port = self.ctld_port or free_port()
        used.add(self.ctld_port)
        while len(self.slurmd_ports) < len(names):
            port = free_port()
            if port not in used:
                used.add(port)
                self.slurmd_ports.append(port)
        r = self.root
        text = f"""\
# lmsdp test cluster (tests/slurm_cluster.py): {len(names)} node(s), auth/none, everything under {r}
ClusterName=lmsdptest
SlurmctldHost={self.node}({self.ctld_address})
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=pmix
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
StateSaveLocation={r}/state
TmpFS={r}/tmpfs-%n
FirstJobId={self.first_job_id}
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
"""
        for name, port in zip(names, self.slurmd_ports):
            text += self.node_line(name, port) + f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN\n"
        text += f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP\n"
        with open(self.conf, "w", encoding="utf-8") as handle:
            handle.write(text)

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Write the config, start the daemons, wait until every node is idle."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local Slurm cluster needs root (slurmd runs jobs as any user)")
        missing = [b for b in DAEMONS + CLIENTS if not find_binary(b)]
        if missing:
            raise ClusterUnavailable(f"Slurm binaries missing: {', '.join(missing)} "
                                     "(apt-get install slurmctld slurmd slurm-client; scripts/setup.sh does it)")
        self.write_config()
        daemons = [("slurmctld", [find_binary("slurmctld") or "slurmctld", "-D", "-i", "-f", self.conf])]
        daemons += [(f"slurmd-{n}", self.slurmd_argv(n)) for n in self.node_names]
        for label, argv in daemons:
            log = open(os.path.join(self.root, "log", f"{label}.stdout"), "ab")
            self.procs.append(subprocess.Popen(argv, stdout=log,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True, env=self.env))
            log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self.stop()
                raise ClusterUnavailable(f"a Slurm daemon exited at start (rc {dead[0].returncode}); "
                                         f"see {self.root}/log: {self.log_tail()}")
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(state) == len(self.node_names) and set(state) == {"idle"}:
                return self
            time.sleep(0.3)
        self.stop()
        raise ClusterUnavailable(f"node not idle after {timeout:.0f}s (state {state!r}): {self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """``scontrol shutdown``, then wait on the daemons we started (kill what is left)."""
        if not self.procs:
            return
        self.run("scontrol", "shutdown", check=False)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            path = os.path.join(self.root, "log", name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    out += [f"{name}: {line.rstrip()}" for line in handle.readlines()[-lines:]]
        return " | ".join(out)

    # ----------------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str, *options: str, cwd: Optional[str] = None) -> str:
        """Submit ``script``; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *options, script], env=self.env, capture_output=True,
                              text=True, cwd=cwd, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", text))
        return Job(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                   int(fields.get("Restarts", "0") or 0), fields)

    def wait(self, job_id: str, timeout: float = 180.0, states: Optional[set] = None,
             release_requeued: bool = True) -> Job:
        """Poll ``scontrol show job`` until the job is in one of ``states`` (default: finished).

        A requeued job waits about two minutes (slurmctld sets its BeginTime); with
        ``release_requeued`` it becomes eligible a few seconds after the requeue instead. Not at once:
        slurmd refuses a relaunch in the same second as the kill ("Job credential revoked") and the
        job would fail."""
        states = states or TERMINAL_STATES
        deadline = time.monotonic() + timeout
        released = 0  # restart count already released
        job = self.job(job_id)
        while job.state not in states:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f}s")
            if release_requeued and job.state == "PENDING" and job.restarts > released \
                    and job.fields.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3", check=False)
                released = job.restarts
            time.sleep(0.5)
            job = self.job(job_id)
        return job


    def wait_gone(self, job_id: str, timeout: float = 120.0) -> Job:
        """Poll until the job has left the queue (no longer running, completing or pending)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still queued after {timeout:.0f}s: {self.job(job_id)}")
            time.sleep(0.5)
        return self.job(job_id)


def _started(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> Iterator[SlurmCluster]:
    try:
        cluster = SlurmCluster(str(tmp_path_factory.mktemp(f"slurm{nodes}n")), nodes=nodes).start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started single-node cluster for the whole session (skips with the reason when there is none)."""
    yield from _started(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two slurmd 'nodes' (n1, n2) on this machine, for the multi-node templates."""
    yield from _started(tmp_path_factory, 2)


if __name__ == "__main__":
    import sys

    cluster = SlurmCluster(tempfile.mkdtemp(prefix="lmsdp-slurm-"), nodes=int(sys.argv[1]) if sys.argv[1:] else 1)
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # kill PID too stops the daemons (finally)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
