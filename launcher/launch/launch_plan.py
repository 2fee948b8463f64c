"""The launch plan: what one ``lmsrun`` call does, resolved from its flags and the config (ranks,
hosts, the program each rank runs, the variables lmsrun sets for every rank), and the ``mpirun``
command that carries it out. Shared by the front door and ``lmsrun tune``'s trials."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lmsdp.runtime import env as envvars

from lmsdp.launcher.config.errors import UserError

SCRIPT_MODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "script_mode")
SWAP_FLAGS = {  # flag dest -> (swap config key, environment variable, how to write it in --set)
    "swap_threshold": ("threshold", "LMSDP_SWAP_THRESHOLD", "str"),
    "swap_prefetch": ("prefetch", "LMSDP_SWAP_PREFETCH", "int"),
    "swap_keep_last": ("keep_last", "LMSDP_SWAP_KEEP_LAST", "int"),
    "swap_budget": ("budget", "LMSDP_SWAP_BUDGET", "str"),
    "swap_host_limit": ("host_limit", "LMSDP_SWAP_HOST_LIMIT", "str"),
    "swap_recompute": ("recompute", "LMSDP_SWAP_RECOMPUTE", "list"),
    "swap_transport": ("transport", "LMSDP_SWAP_TRANSPORT", "str"),
    "swap_link_gbps": ("link_gbps", "LMSDP_SWAP_LINK_GBPS", "number"),
    "swap_disk_dir": ("disk_dir", "LMSDP_SWAP_DISK_DIR", "str"),
    "swap_disk_limit": ("disk_limit", "LMSDP_SWAP_DISK_LIMIT", "str"),
}



@dataclass
class LaunchPlan:
    """What one lmsrun call does, resolved from flags and config."""

    args: argparse.Namespace
    script: Optional[List[str]]  # the user's command in script mode
    config: Any  # Config or None
    np: int = 1
    hosts: Optional[str] = None
    hostfile: Optional[str] = None
    mpi_args: str = ""
    oversubscribe: bool = False
    threads: Any = 0  # int, or "auto" (launcher.threads)
    rank_env: Dict[str, str] = field(default_factory=dict)

    @property
    def script_mode(self) -> bool:
        return self.script is not None


def config_overrides(args: argparse.Namespace) -> List[str]:
    """The ``--set`` list that turns flags into config keys (the ranks apply the same list)."""
    items = list(args.overrides)
    if args.resume:
        items.append("train.resume=true")
    if args.output_dir:
        items.append(f"train.output_dir={json.dumps(args.output_dir)}")
    if args.threads is not None:
        items.append(f"launch.threads={args.threads}")
    swap_given = False
    for dest, (key, _var, kind) in SWAP_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        swap_given = True
        if kind == "list":
            parts = [p.strip() for p in str(value).split(",") if p.strip()]
            text = json.dumps("auto" if parts == ["auto"] else parts)
        else:
            text = str(value) if kind in ("int", "number") else json.dumps(str(value))
        items.append(f"swap.{key}={text}")
    if swap_given:
        items.append("swap.enabled=true")
    return items


def make_plan(args: argparse.Namespace, script: Optional[List[str]]) -> LaunchPlan:
    config = None
    launch: Any = None
    if args.config is not None:
        # Only with a config: loading it imports torch (model zoo), seconds that script mode without
        # a config need not spend before mpirun starts.
        from lmsdp.launcher.config import load_config

        config = load_config(args.config, config_overrides(args))
        launch = config.launch
    plan = LaunchPlan(args, script, config, np=args.np or (launch.np if launch else 1),
                hosts=args.hosts if args.hosts is not None else (None if args.hostfile or not launch else launch.hosts),
                hostfile=args.hostfile if args.hostfile is not None else (
                    None if args.hosts or not launch else launch.hostfile),
                mpi_args=args.mpi_args if args.mpi_args is not None else (launch.mpi_args if launch else ""),
                oversubscribe=bool(args.oversubscribe) or bool(launch and launch.oversubscribe),
                threads=args.threads if args.threads is not None else (launch.threads if launch else 0))
    if plan.hosts and plan.hostfile:
        raise UserError("-H and --hostfile are both given: use one of them")
    if plan.hostfile and not os.path.isfile(plan.hostfile):
        raise UserError(f"--hostfile: file not found: {plan.hostfile}")
    if (plan.hosts or plan.hostfile) and not args.dry_run:
        from lmsdp.launcher.config.input_checks import check_hosts_resolve
        from .mpi_command import parse_hostfile, parse_hosts

        hosts = parse_hosts(plan.hosts) if plan.hosts else parse_hostfile(plan.hostfile)  # type: ignore[arg-type]
        check_hosts_resolve([h.name for h in hosts], "-H" if plan.hosts else f"--hostfile {plan.hostfile}")
    plan.rank_env = rank_environment(plan)
    return plan


def rank_environment(plan: LaunchPlan) -> Dict[str, str]:
    """Variables lmsrun sets for every rank (exported by value, so a dry-run command is complete)."""
    env = {envvars.LAUNCHED: "1", envvars.EXPECTED_NP: str(plan.np), "PYTHONUNBUFFERED": "1"}
    if _stderr_is_terminal():
        env[envvars.TTY] = "1"  # the bar draws on rank 0 even though mpirun gives it a pipe
        env["COLUMNS"] = str(shutil.get_terminal_size().columns)  # a pipe has no width of its own
    if plan.script_mode:
        env.update(script_swap_env(plan))
        here = os.environ.get("PYTHONPATH", "")
        env["PYTHONPATH"] = SCRIPT_MODE_DIR + (os.pathsep + here if here else "")
        if "OMP_NUM_THREADS" not in os.environ:
            from lmsdp.runtime.topology import cpu_share

            local = plan.np if not (plan.hosts or plan.hostfile) else 1
            fixed = plan.threads if isinstance(plan.threads, int) else 0  # auto needs the worker's hooks
            env["OMP_NUM_THREADS"] = str(fixed or cpu_share(local))
    return env


def script_swap_env(plan: LaunchPlan) -> Dict[str, str]:
    """LMSDP_SWAP_* for script mode: from flags, else from the config's swap: section when enabled."""
    env: Dict[str, str] = {}
    args = plan.args
    for dest, (key, var, kind) in SWAP_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            env[var] = str(value)
    if not env and plan.config is not None and plan.config.swap.enabled:
        swap = plan.config.swap
        for dest, (key, var, kind) in SWAP_FLAGS.items():
            value = getattr(swap, key)
            if value is not None:
                env[var] = ",".join(value) if isinstance(value, list) else str(value)
    if env:
        env = {envvars.SWAP: "1", **env}
    return env


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def rank_program(plan: LaunchPlan) -> List[str]:
    """What each rank runs: the worker re-invoked in place, or the user's command."""
    if plan.script_mode:
        assert plan.script is not None
        program = list(plan.script)
        if program[0] in ("python", "python3"):
            program[0] = sys.executable  # the interpreter lmsrun runs in (its venv), not whatever is on PATH
        return program
    args = plan.args
    program = [sys.executable, "-m", "lmsdp.launcher.cli", args.config]
    for item in args.overrides:
        program += ["--set", item]
    if args.resume:
        program.append("--resume")
    if args.output_dir:
        program += ["--output-dir", args.output_dir]
    if plan.threads:
        program += ["--threads", str(plan.threads)]
    for dest in SWAP_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            program += ["--" + dest.replace("_", "-"), str(value)]
    return program


def tcp_include(plan: LaunchPlan) -> Optional[str]:
    """Open MPI's ``btl_tcp_if_include``/``oob_tcp_if_include`` for ``comm.interface`` (script mode: auto)."""
    from lmsdp.runtime.network import AUTO, mpirun_include

    from .mpi_command import is_local, parse_hostfile, parse_hosts

    spec = plan.config.comm.interface if plan.config is not None else AUTO
    if not (plan.hosts or plan.hostfile):
        return None if spec == AUTO else spec
    hosts = parse_hosts(plan.hosts) if plan.hosts else parse_hostfile(plan.hostfile)  # type: ignore[arg-type]
    if spec == AUTO and is_local(hosts):
        return None
    return mpirun_include(spec, [h.name for h in hosts])


def mpi_command(plan: LaunchPlan) -> tuple:
    """(argv, flavour, environment for mpirun, rank -> host when the hosts are listed)."""
    from .mpi_command import MPIRequest, build_command, find_mpirun, rank_hosts

    mpirun, flavor = find_mpirun()
    request = MPIRequest(np=plan.np, program=rank_program(plan), hosts=plan.hosts, hostfile=plan.hostfile,
                         mpi_args=plan.mpi_args, oversubscribe=plan.oversubscribe, set_env=plan.rank_env,
                         inherit_env=os.environ, tcp_include=tcp_include(plan))
    argv = build_command(request, mpirun=mpirun, flavor=flavor, is_root=os.geteuid() == 0)
    return argv, flavor, {**os.environ, **plan.rank_env}, rank_hosts(request)

