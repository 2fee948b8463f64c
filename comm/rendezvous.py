"""How torch.distributed ranks meet: rank 0's TCPStore on the job's interface, and who is where.

In this order:
1. the topology says an MPI world exists (mpirun, srun --mpi=pmix): mpi4py gives rank/size/local
   rank; every rank's host and interfaces are gathered, ``comm.interface`` picks one per rank
   (``lmsdp.runtime.network.agree``: the same answer on every rank), gloo/NCCL/Horovod are told its
   name, and rank 0 opens a TCPStore listening only on that address on a free port (port 0, so no
   race) and broadcasts address:port;
2. the topology has a store address from the launcher (torchrun's MASTER_ADDR/MASTER_PORT);
3. otherwise a single process, on loopback.
A rank that cannot reach rank 0's store within ``comm.timeout_s`` fails with one line naming both
hosts.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import List, Optional, Tuple

import torch.distributed as dist

from lmsdp.runtime.network import (AUTO, InterfaceError, advertised_address, agree, local_interfaces, use_interface,
                                   use_local)
from lmsdp.runtime.topology import Topology, unreachable_world

from .base import CommError
from .config import CommConfig


@dataclass
class Rendezvous:
    """Where this rank sits and how the process group is reached."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    store: Optional[dist.Store]
    via: str
    peers: List[Tuple[str, int]] = field(default_factory=list)  # (hostname, pid) per rank, if known


def listen(address: str, size: int, timeout: timedelta) -> dist.TCPStore:
    """Rank 0's store, listening on ``address`` only (torch's own server listens on every interface)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(max(128, size))
    port = sock.getsockname()[1]
    return dist.TCPStore(address, port, size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def connect(address: str, port: int, size: int, timeout_s: float, host: str, main_host: str,
            rank: int) -> dist.TCPStore:
    """A client of rank 0's store; unreachable within ``timeout_s`` is one line naming both hosts."""
    try:
        store = dist.TCPStore(address, port, size, False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - torch raises DistNetworkError/RuntimeError/TimeoutError
        raise CommError(f"torch backend: rank {rank} on host {host} cannot reach rank 0's store at "
                        f"{address}:{port} on host {main_host} within comm.timeout_s={timeout_s:g} s "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})",
                        backend="torch") from None
    store.set_timeout(timedelta(seconds=max(60.0, timeout_s)))
    return store


def rendezvous(topology: Topology, config: CommConfig) -> Rendezvous:
    """Meet the other ranks (see the module docstring)."""
    store_timeout = timedelta(seconds=max(60.0, config.timeout_s))
    host = socket.gethostname()
    spec = config.interface
    if topology.mpi_world:
        from mpi4py import MPI  # initializes MPI; only imported when launched by MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
        views = comm.allgather((host, os.getpid(), local_interfaces()))
        peers = [(h, pid) for h, pid, _ in views]
        try:
            chosen = agree(spec, [(h, interfaces) for h, _, interfaces in views])
        except InterfaceError as exc:
            raise CommError(str(exc), backend="torch") from None
        use_interface(chosen[rank], explicit=spec != AUTO)
        endpoint = None
        store = None
        if rank == 0:  # listens on the chosen interface; LMSDP_MASTER_ADDR (a NAT, a name) only advertises
            store = listen(chosen[0].address, size, store_timeout)
            endpoint = (advertised_address() or chosen[0].address, int(store.port))
        addr, port = comm.bcast(endpoint, root=0)
        if rank != 0:
            store = connect(addr, port, size, config.timeout_s, host, peers[0][0], rank)
        return Rendezvous(rank, size, local_rank, local_size, store,
                          f"mpi4py ({addr}:{port} on {chosen[rank].name})", peers)
    if topology.main_port is not None:
        try:
            use_local(spec, host)
        except InterfaceError as exc:
            raise CommError(str(exc), backend="torch") from None
        rank, size = topology.rank, topology.size
        addr, port = topology.main_address or "127.0.0.1", topology.main_port
        store = dist.TCPStore(addr, port, size, rank == 0, timeout=store_timeout)
        # share (host, pid) through the store so a dead local peer can be named later
        store.set(f"lmsdp/peer/{rank}", f"{host} {os.getpid()}")
        peers = []
        for r in range(size):
            h, pid = store.get(f"lmsdp/peer/{r}").decode().split()
            peers.append((h, int(pid)))
        return Rendezvous(rank, size, topology.local_rank, topology.local_size, store, f"env ({addr}:{port})", peers)
    problem = unreachable_world()
    if problem:
        raise CommError(f"torch backend: {problem} but no MPI or torchrun environment to rendezvous through; "
                        "launch with mpirun, srun --mpi=pmix or torchrun, or use the horovod backend",
                        backend="torch")
    store = listen("127.0.0.1", 1, store_timeout)
    return Rendezvous(0, 1, 0, 1, store, f"single process (127.0.0.1:{store.port})",
                      [(host, os.getpid())])
