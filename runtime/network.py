"""Which network interface a job uses: chosen from ``comm.interface``, never guessed from a host name.

``comm.interface`` is an interface name (``eth0``), a CIDR (``10.0.0.0/8``) or ``auto``. Names and
CIDRs are resolved on each host against its own interfaces. ``auto`` needs what every rank sees:
each rank lists its IPv4 interfaces, the lists are gathered (over MPI, see ``comm.rendezvous``), and
every rank applies the same rule to the same data, so all agree without another message: all ranks
on one host use loopback; otherwise the first of rank 0's interfaces whose network holds an address
of every other host (horovodrun's NIC check does the same by probing), and on each host the
interface in that network. Torch-free: the launcher (mpirun flags) and the comm backends use it.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import env as envvars

AUTO = "auto"
_SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFNETMASK = 0x8913, 0x8915, 0x891B
_IFF_UP = 0x1
_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
# the variables each stack reads to pick its interface (set in a rank before the stack starts)
IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "HOROVOD_GLOO_IFACE")


class InterfaceError(ValueError):
    """No interface matches, or the hosts share no network: the message names the host."""


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of a network interface that is up."""

    name: str
    address: str
    prefix: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.address}/{self.prefix}", strict=False)

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    def __str__(self) -> str:
        return f"{self.name} {self.address}/{self.prefix}"


def _ioctl(sock: socket.socket, request: int, name: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))


def local_interfaces() -> List[Interface]:
    """This host's interfaces that are up and have an IPv4 address, in kernel index order."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                flags = struct.unpack("H", _ioctl(sock, _SIOCGIFFLAGS, name)[16:18])[0]
                if not flags & _IFF_UP:
                    continue
                address = socket.inet_ntoa(_ioctl(sock, _SIOCGIFADDR, name)[20:24])
                mask = socket.inet_ntoa(_ioctl(sock, _SIOCGIFNETMASK, name)[20:24])
            except OSError:
                continue  # no IPv4 address
            found.append(Interface(name, address, ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen))
    return found


def check_spec(spec: str) -> Optional[str]:
    """What is wrong with a ``comm.interface`` value, else None."""
    if spec in ("", AUTO) or _NAME.fullmatch(spec) and not spec[0].isdigit():
        return None
    try:
        ipaddress.ip_network(spec, strict=False)
        return None
    except ValueError:
        return f"{spec!r} is neither an interface name, a CIDR (e.g. 10.0.0.0/8) nor auto"


def matching(spec: str, interfaces: Sequence[Interface], host: str) -> Interface:
    """The interface named by ``spec`` (a name or a CIDR) among this host's ``interfaces``."""
    if _NAME.fullmatch(spec) and not spec[0].isdigit():
        hits = [i for i in interfaces if i.name == spec]
    else:
        network = ipaddress.ip_network(spec, strict=False)
        hits = [i for i in interfaces if ipaddress.ip_address(i.address) in network]
    if not hits:
        have = ", ".join(map(str, interfaces)) or "none with IPv4"
        raise InterfaceError(f"comm.interface: no interface on host {host} matches {spec!r}; it has: {have}")
    return hits[0]


def agree(spec: str, views: Sequence[Tuple[str, List[Interface]]]) -> List[Interface]:
    """The interface of each rank, given every rank's (host, interfaces); views[0] is rank 0.

    The same answer on every rank for the same ``views``, so gathering them is the whole agreement."""
    if spec and spec != AUTO:
        return [matching(spec, interfaces, host) for host, interfaces in views]
    hosts: Dict[str, List[Interface]] = {}
    for host, interfaces in views:
        hosts.setdefault(host, interfaces)
    if len(hosts) == 1:
        loop = [i for i in views[0][1] if i.loopback] or [Interface("lo", "127.0.0.1", 8)]
        return [loop[0]] * len(views)
    main_host, main_interfaces = views[0]
    others = [h for h in hosts if h != main_host]
    for candidate in (i for i in main_interfaces if not i.loopback):
        net = candidate.network
        if all(any(ipaddress.ip_address(i.address) in net for i in hosts[h]) for h in others):
            return [candidate if host == main_host else
                    next(i for i in interfaces if ipaddress.ip_address(i.address) in net)
                    for host, interfaces in views]
    missing = [h for h in others if not any(ipaddress.ip_address(i.address) in c.network
                                           for c in main_interfaces if not c.loopback for i in hosts[h])]
    shown = ", ".join(str(i) for i in main_interfaces if not i.loopback) or "no network interface"
    raise InterfaceError(f"comm.interface auto: host {missing[0]} shares no network with rank 0's host "
                         f"{main_host} ({shown}); set comm.interface to the network that joins the hosts")


def stack_variables(interface: Interface) -> Dict[str, str]:
    """What gloo, NCCL and Horovod's gloo read to use ``interface``."""
    return {name: interface.name for name in IFNAME_VARIABLES}


def use_interface(interface: Interface, explicit: bool) -> None:
    """Tell gloo, NCCL and Horovod's gloo which interface to use in this process; an explicit
    ``comm.interface`` wins over what the user exported, ``auto`` does not."""
    for name, value in stack_variables(interface).items():
        if explicit or name not in os.environ:
            os.environ[name] = value


def use_local(spec: str, host: str) -> Optional[Interface]:
    """For a name or CIDR: find it on this host and use it (no other rank needed); ``auto``: None."""
    if not spec or spec == AUTO:
        return None
    interface = matching(spec, local_interfaces(), host)
    use_interface(interface, explicit=True)
    return interface


def route_source(address: str) -> Optional[str]:
    """The local address this host would send from to reach ``address`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((address, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def mpirun_include(spec: str, hosts: Sequence[str]) -> Optional[str]:
    """What Open MPI's ``btl_tcp_if_include``/``oob_tcp_if_include`` get for ``comm.interface`` on
    the launching host: a name or CIDR as given; for ``auto``, the CIDR of the local interface that
    reaches the hosts (resolved through the system resolver), else None (Open MPI's own choice)."""
    if spec and spec != AUTO:
        return spec
    interfaces = [i for i in local_interfaces() if not i.loopback]
    for host in hosts:
        try:
            address = socket.gethostbyname(host)
        except OSError:
            return None
        if ipaddress.ip_address(address).is_loopback:
            continue
        source = route_source(address)
        for interface in interfaces:
            if interface.address == source:
                return str(interface.network)
        return None
    return None


def advertised_address(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``LMSDP_MASTER_ADDR`` when the user set it (it overrides the interface's address), else None."""
    env = os.environ if env is None else env
    return env.get(envvars.MASTER_ADDR) or None
