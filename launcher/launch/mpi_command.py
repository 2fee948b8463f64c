"""Build the ``mpirun`` command line for one job: hosts and slots, binding, exported variables.

Pure functions of their inputs (the MPI flavour, root-ness and core count are arguments), so the
exact command is testable and ``--dry-run`` prints what would run.

Binding: ``--map-by slot --bind-to none``. One rank drives one GPU and runs several intra-op
threads (cores per node / ranks per node, set by the worker). Open MPI's default binds each rank to
one core (np <= 2) or one socket (np > 2): the former squeezes all of a rank's threads onto a single
core. ``--bind-to none`` leaves placement to the OS, and the thread count already prevents
oversubscription; by-slot mapping fills a node's slots with consecutive ranks, so local rank ==
GPU index and node rank == rank // ranks-per-node. Users who want pinning pass
``--mpi-args "--map-by slot:PE=4 --bind-to core"``; ours are then left out (Open MPI rejects a
repeated --map-by/--bind-to).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from lmsdp.runtime import env as envvars

from lmsdp.launcher.config.errors import UserError

# Variables every rank needs, in this order, then every variable with one of the prefixes (sorted).
EXPORT_NAMES = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES")
EXPORT_PREFIXES = ("LMSDP_", "OMP_", "MKL_", "HOROVOD_", "NCCL_", "GLOO_", "TORCH_", "PYTORCH_")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class Host:
    name: str
    slots: int


@dataclass
class MPIRequest:
    """Everything the command depends on; ``set_env`` are variables lmsrun sets (exported with values)."""

    np: int
    program: List[str]
    hosts: Optional[str] = None
    hostfile: Optional[str] = None
    mpi_args: str = ""
    oversubscribe: bool = False
    set_env: Dict[str, str] = field(default_factory=dict)
    inherit_env: Mapping[str, str] = field(default_factory=dict)
    tcp_include: Optional[str] = None  # Open MPI's btl/oob_tcp_if_include (comm.interface), None: its default


def parse_hosts(spec: str) -> List[Host]:
    """'host1:2,host2:4' (horovodrun -H) -> hosts with slots; a bare host has 1 slot."""
    hosts = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, slots = item.rpartition(":")
        if not sep:
            name, slots = item, "1"
        if not name or not slots.isdigit() or int(slots) < 1:
            raise UserError(f"-H: expected host:slots (e.g. node1:4,node2:4), got {item!r}")
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise UserError("-H: no hosts given", hint="e.g. -H node1:4,node2:4")
    return hosts


def parse_hostfile(path: str) -> List[Host]:
    """Open MPI / horovodrun hostfile: 'host slots=N' or 'host:N' or 'host' per line, # comments."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"--hostfile: cannot read {path}: {exc.strerror}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+?)(?::(\d+))?(?:\s+(?:slots|max_slots|max-slots)\s*=\s*(\d+).*)?", line)
        if not match:
            raise UserError(f"{path}:{number}: expected 'host slots=N', got {line!r}")
        hosts.append(Host(match.group(1), int(match.group(3) or match.group(2) or 1)))
    if not hosts:
        raise UserError(f"--hostfile {path}: no hosts in the file")
    return hosts


def rank_hosts(req: MPIRequest) -> Dict[int, str]:
    """rank -> host under our ``--map-by slot`` (each host's slots filled in order); empty when the
    hosts are not listed or the user's --mpi-args choose another mapping."""
    if not (req.hosts or req.hostfile) or re.search(r"(^|\s)-{1,2}(map-by|bynode|npernode)", req.mpi_args or ""):
        return {}
    hosts = parse_hosts(req.hosts) if req.hosts else parse_hostfile(req.hostfile)  # type: ignore[arg-type]
    names = [h.name for h in hosts for _ in range(h.slots)]
    if req.np > len(names):
        return {}
    return dict(enumerate(names[:req.np]))


def is_local(hosts: Sequence[Host]) -> bool:
    names = LOCAL_NAMES | {socket.gethostname(), socket.gethostname().split(".")[0]}
    return all(h.name in names for h in hosts)


def physical_cores() -> int:
    """Open MPI's default slot count on this machine: physical cores (not hardware threads)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def detect_flavor(mpirun: str) -> str:
    """'openmpi' or 'mpich' (Hydra: MPICH, Intel MPI, MVAPICH) from ``mpirun --version``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "openmpi"
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if re.search(r"HYDRA|MPICH|Intel\(R\) MPI", text, re.I):
        return "mpich"
    return "openmpi"


def find_mpirun() -> Tuple[str, str]:
    """(path, flavour) of the MPI launcher: $LMSDP_MPIRUN, else mpirun, else mpiexec, on PATH."""
    override = envvars.read(envvars.MPIRUN)
    candidates = [override] if override else ["mpirun", "mpiexec"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path, detect_flavor(path)
    raise UserError("mpirun not found on PATH" + (f" (LMSDP_MPIRUN={override})" if override else ""),
                    hint="install Open MPI (apt-get install openmpi-bin) or MPICH, or set LMSDP_MPIRUN")


def exported_names(req: MPIRequest) -> List[str]:
    """Names to export to ranks: fixed names, then prefixed ones, each once, only when set."""
    present = {**req.inherit_env, **req.set_env}
    names = [n for n in EXPORT_NAMES if n in present]
    names += sorted(n for n in present if n.startswith(EXPORT_PREFIXES) and n not in names)
    return names


def _export_items(req: MPIRequest) -> List[str]:
    return [f"{n}={req.set_env[n]}" if n in req.set_env else n for n in exported_names(req)]


def build_command(req: MPIRequest, mpirun: str = "mpirun", flavor: str = "openmpi", is_root: bool = False,
                  local_cores: Optional[int] = None) -> List[str]:
    """The full argv to start ``req.np`` copies of ``req.program``."""
    if req.hosts and req.hostfile:
        raise UserError("-H and --hostfile are both given: use one of them")
    hosts = parse_hosts(req.hosts) if req.hosts else parse_hostfile(req.hostfile) if req.hostfile else None
    extra = shlex.split(req.mpi_args or "")
    cores = physical_cores() if local_cores is None else local_cores
    oversubscribe = req.oversubscribe
    if hosts is not None:
        slots = sum(h.slots for h in hosts)
        if req.np > slots and not oversubscribe:
            where = "-H" if req.hosts else "--hostfile"
            raise UserError(f"-np {req.np} is more than the {slots} slot(s) in {where}",
                            hint="lower -np, add slots (host:N), or pass --oversubscribe")
    elif req.np > cores:
        oversubscribe = True  # more ranks than this machine's cores: Open MPI refuses without it
    if flavor == "mpich":
        return _hydra(req, mpirun, hosts, extra)
    cmd = [mpirun]
    if is_root:
        cmd.append("--allow-run-as-root")
    cmd += ["-np", str(req.np)]
    if req.hosts:
        cmd += ["-H", ",".join(f"{h.name}:{h.slots}" for h in hosts or [])]
    elif req.hostfile:
        cmd += ["--hostfile", req.hostfile]
    if oversubscribe and "--oversubscribe" not in extra:
        cmd.append("--oversubscribe")
    if not any(a.startswith(("--map-by", "-map-by", "--bynode", "--byslot", "--npernode")) for a in extra):
        cmd += ["--map-by", "slot"]
    if not any(a.startswith(("--bind-to", "-bind-to")) for a in extra):
        cmd += ["--bind-to", "none"]
    cmd.append("--tag-output")
    if req.tcp_include:
        for param in ("btl_tcp_if_include", "oob_tcp_if_include"):
            if param not in extra:
                cmd += ["--mca", param, req.tcp_include]
    for item in _export_items(req):
        cmd += ["-x", item]
    return cmd + extra + list(req.program)


def _hydra(req: MPIRequest, mpiexec: str, hosts: Optional[List[Host]], extra: List[str]) -> List[str]:
    """MPICH / Intel MPI Hydra: -n, -hosts h:s,.., -f file, -genv/-genvlist, -prepend-rank."""
    cmd = [mpiexec, "-n", str(req.np)]
    if req.hosts:
        cmd += ["-hosts", ",".join(f"{h.name}:{h.slots}" for h in hosts or [])]
    elif req.hostfile:
        cmd += ["-f", req.hostfile]
    if not any(a.startswith("-bind-to") for a in extra):
        cmd += ["-bind-to", "none"]
    cmd.append("-prepend-rank")
    for name, value in req.set_env.items():
        cmd += ["-genv", name, value]
    inherited = [n for n in exported_names(req) if n not in req.set_env]
    if inherited:
        cmd += ["-genvlist", ",".join(inherited)]
    return cmd + extra + list(req.program)
