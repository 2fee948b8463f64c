"""Several hosts on one machine, for tests: one Linux network namespace per host, joined by a bridge.

Follows the tested recipe in the shared DESIGN.md ("Several hosts on one machine"). Each host has its
own network stack (``eth0`` with an address on a private /24 that this run picks unused), its own
hostname (UTS namespace) and its own ``/tmp`` (a mount namespace with a per-host folder bound on
``/tmp``, so files written there survive between jobs, as on a real node); the project folder and
the rest of the file system stay shared, like a cluster's shared home. The root namespace holds
the bridge with the network's first address: that is where ``lmsrun`` and ``mpirun`` run (a login
node). Open MPI reaches the hosts through an rsh agent (``plm_rsh_agent``, kept outside ``/tmp``)
that runs the command inside the host's namespaces; the hostfile names hosts by address, so
nothing needs a name resolver. The PID namespace stays shared, so ``ip netns pids`` lists a host's
processes and a test can kill or stop them.

Names (namespaces, bridge, veths) carry a per-run tag, so two runs never meet, and ``stop()`` removes
everything, also after a failure. ``NetnsCluster.start()`` raises ``ClusterUnavailable`` with the
reason when this machine cannot (not root, no iproute2/unshare, no CAP_NET_ADMIN).
"""
from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import pytest

from tests.slurm_cluster import ClusterUnavailable


@dataclass
class NsHost:
    """One host: its hostname, namespace, address and the folder bound on its /tmp."""

    name: str
    netns: str
    address: str
    tmp: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no interface or route of this machine uses."""
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(128, 250)}.{rng.randrange(0, 256)}.0/24")
        if f"{str(net.network_address)[:-1]}" not in used:
            return net
    raise ClusterUnavailable("no free 10.x.y.0/24 for the namespace hosts")


class NetnsCluster:
    """``hosts`` namespace hosts named h1..hN (see the module docstring)."""

    def __init__(self, hosts: int = 2) -> None:
        self.count = hosts
        self.tag = f"{os.getpid() % 100000:05d}{random.randrange(100):02d}"
        self.bridge = f"lmb{self.tag}"
        self.hosts: List[NsHost] = []
        self.folder = ""
        self.network: Optional[ipaddress.IPv4Network] = None
        self.bridge_address = ""

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> "NetnsCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("namespace hosts need root (ip netns, unshare)")
        for tool in ("ip", "unshare", "nsenter", "mpirun"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"{tool} not on PATH (iproute2 / util-linux / Open MPI)")
        # outside /tmp: every host has its own /tmp, and the agent must be found on every host
        self.folder = tempfile.mkdtemp(prefix=f"lmsdp-netns-{self.tag}-", dir="/var/tmp")
        try:
            self._build()
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.stop()
            raise ClusterUnavailable(f"cannot build the namespace hosts: {detail.strip()}") from None
        return self

    def _build(self) -> None:
        self.network = _free_subnet()
        addresses = list(self.network.hosts())
        prefix = self.network.prefixlen
        self.bridge_address = str(addresses[0])
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index in range(1, self.count + 1):
            host = NsHost(f"h{index}", f"lmsdp-{self.tag}-h{index}", str(addresses[index]),
                          os.path.join(self.folder, f"h{index}-tmp"))
            os.makedirs(host.tmp)
            os.chmod(host.tmp, 0o1777)
            self.hosts.append(host)
            outer, inner = f"lmv{self.tag}{index}", f"lmi{self.tag}{index}"
            _ip("netns", "add", host.netns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
        self._write_agent()
        with open(self.hostfile(1), "w", encoding="utf-8") as handle:
            handle.writelines(f"{h.address} slots=2\n" for h in self.hosts)

    def stop(self) -> None:
        """Kill what runs on the hosts, delete namespaces and bridge, remove the folder."""
        for host in self.hosts:
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", host.netns, check=False)
        for index in range(1, len(self.hosts) + 1):  # a namespace outlives its del while a killed process exits
            _ip("link", "del", f"lmv{self.tag}{index}", check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # --- what tests use --------------------------------------------------------------------------
    @property
    def agent(self) -> str:
        return os.path.join(self.folder, "rsh-agent")

    @property
    def cidr(self) -> str:
        return str(self.network)

    def hostfile(self, slots: int = 2) -> str:
        path = os.path.join(self.folder, f"hostfile-{slots}")
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{h.address} slots={slots}\n" for h in self.hosts)
        return path

    def host(self, name: str) -> NsHost:
        return next(h for h in self.hosts if h.name == name or h.address == name)

    def env(self, base: Dict[str, str]) -> Dict[str, str]:
        """``base`` plus what makes Open MPI launch into the hosts (the agent, one orted per host)."""
        return {**base, "OMPI_MCA_plm_rsh_agent": self.agent, "OMPI_MCA_plm_rsh_no_tree_spawn": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

    def pids(self, host: NsHost) -> List[int]:
        """Processes in the host's network namespace."""
        out = _ip("netns", "pids", host.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def link(self, host: NsHost, up: bool) -> None:
        """Cut (or restore) the host's network: its end of the cable goes down."""
        _ip("-n", host.netns, "link", "set", "eth0", "up" if up else "down")

    def run_on(self, host: NsHost, command: List[str], **kwargs) -> subprocess.CompletedProcess:
        """``command`` on ``host`` (its network, hostname and /tmp), as the agent runs it."""
        return subprocess.run([self.agent, host.address, *map(_quote, command)], **kwargs)

    def _write_agent(self) -> None:
        cases = "\n".join(
            f"  {h.address}|{h.name}) ns={h.netns}; name={h.name}; tmp={h.tmp} ;;" for h in self.hosts)
        # nsenter --net keeps /sys (and its cgroup mounts) as they are; ip netns exec remounts it
        script = f"""#!/bin/sh
# rsh agent for the namespace hosts of one test run: AGENT HOST COMMAND...
host=$1; shift
case "$host" in
{cases}
  *) echo "rsh-agent: unknown host $host" >&2; exit 255 ;;
esac
exec nsenter --net=/run/netns/$ns unshare --uts --mount --propagation private \\
  sh -c "hostname $name && mount --bind $tmp /tmp && exec sh -c \\"\\$0\\"" "$*"
"""
        with open(self.agent, "w", encoding="utf-8") as handle:
            handle.write(script)
        os.chmod(self.agent, os.stat(self.agent).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def started(hosts: int = 2) -> Iterator[NetnsCluster]:
    """For a pytest fixture: a started cluster (skips with the reason when this machine has none),
    stopped afterwards, also after a failure."""
    cluster = NetnsCluster(hosts)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)
