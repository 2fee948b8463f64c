"""``lmsrun``: one command for one rank, N local ranks, or ranks on several hosts.

    lmsrun CONFIG [-np N] [-H h1:4,h2:4 | --hostfile F] [--mpi-args "..."] [--set k=v ..] [--resume]
                  [--output-dir D] [--dry-run]
    lmsrun [CONFIG] -np N [--swap-threshold 1MiB ...] -- python train.py ARGS     (script mode)

Three ways a call ends up (like torchrun: flags -> a plan -> workers):
- started as a rank by mpirun/mpiexec, srun or torchrun (their variables are set): run in place,
  i.e. the worker (config mode) or exec the user's command (script mode);
- a config with one rank on this machine: run the worker in this process (no mpirun start-up cost);
- otherwise build ``mpirun ... python -m lmsdp.launcher.cli CONFIG ...`` (or ``mpirun ... python
  train.py``) and run it through ``launcher.spawn``, which forwards signals, prefixes output with the
  rank and reports the first rank that failed.
Flags override ``launch:`` in the config; horovodrun's -np/-H/--hostfile/--mpi-args mean the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import shlex
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lmsdp.runtime import env as envvars
from lmsdp.swapping.registry import TRANSPORTS

from .argtypes import OneLineParser, nonneg_int, positive_int
from .errors import TopologyError, UserError
from .subcommands import dispatch, epilog

SCRIPT_MODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "script_mode")
SWAP_FLAGS = {  # flag dest -> (swap config key, environment variable, how to write it in --set)
    "swap_threshold": ("threshold", "LMSDP_SWAP_THRESHOLD", "str"),
    "swap_prefetch": ("prefetch", "LMSDP_SWAP_PREFETCH", "int"),
    "swap_keep_last": ("keep_last", "LMSDP_SWAP_KEEP_LAST", "int"),
    "swap_budget": ("budget", "LMSDP_SWAP_BUDGET", "str"),
    "swap_host_limit": ("host_limit", "LMSDP_SWAP_HOST_LIMIT", "str"),
    "swap_recompute": ("recompute", "LMSDP_SWAP_RECOMPUTE", "list"),
    "swap_transport": ("transport", "LMSDP_SWAP_TRANSPORT", "str"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmsrun", allow_abbrev=False,
        usage="lmsrun [CONFIG] [-np N] [-H HOSTS | --hostfile F] [options] [-- COMMAND ...]",
        description="Data-parallel training with large model support: one MPI rank per GPU. "
                    "With '-- COMMAND', runs your own script (e.g. a Horovod one) under the same launch.",
        epilog=epilog(), formatter_class=_ListsAsWritten)
    parser.add_argument("config", nargs="?", help="YAML config file (optional in script mode)")
    launch = parser.add_argument_group("launch (override the config's launch: section; as in horovodrun)")
    launch.add_argument("-np", "--num-proc", dest="np", type=positive_int, metavar="N",
                        help="number of ranks, one per GPU (default: launch.np, or 1)")
    launch.add_argument("-H", "--hosts", metavar="HOST:SLOTS,..", help="hosts and their slots, e.g. n1:4,n2:4")
    launch.add_argument("--hostfile", metavar="FILE", help="Open MPI / horovodrun hostfile ('host slots=N')")
    launch.add_argument("--mpi-args", metavar="ARGS", help="extra mpirun arguments, passed verbatim")
    launch.add_argument("--oversubscribe", action="store_true", default=None,
                        help="allow more ranks than cores (added anyway when ranks exceed local cores)")
    launch.add_argument("--threads", type=_threads, metavar="N|auto",
                        help="intra-op threads per rank (0: cores / ranks; auto: measured per module)")
    launch.add_argument("--dry-run", action="store_true", help="print the command and the resolved config, run nothing")
    launch.add_argument("--stop-timeout", type=_seconds, default=120.0, metavar="S",
                        help="after SIGINT/SIGTERM, seconds the ranks get to checkpoint before being killed")
    launch.add_argument("-v", "--verbose", action="store_true", help="show mpirun's own messages as they come")
    run = parser.add_argument_group("run")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set swap.threshold=1MiB (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    run.add_argument("--output-dir", metavar="DIR", help="train.output_dir, and rank<R>.log files of each rank's output")
    swap = parser.add_argument_group("swap engine (config mode: swap.*; script mode: LMSDP_SWAP_* for every rank)")
    swap.add_argument("--swap-threshold", metavar="SIZE", help="smallest saved tensor swapped, e.g. 1MiB")
    swap.add_argument("--swap-prefetch", type=nonneg_int, metavar="N", help="swap-ins started ahead")
    swap.add_argument("--swap-keep-last", type=nonneg_int, metavar="K", help="last K saved tensors never swapped")
    swap.add_argument("--swap-budget", metavar="SIZE", help="saved bytes kept on the device before swapping")
    swap.add_argument("--swap-host-limit", metavar="SIZE", help="cap on pinned host memory")
    swap.add_argument("--swap-recompute", metavar="KINDS", help="'auto' or a comma list, e.g. relu,batchnorm")
    swap.add_argument("--swap-transport", choices=TRANSPORTS.choices(), help="swap transport")
    return parser


class _ListsAsWritten(argparse.HelpFormatter):
    """Wraps one-paragraph texts (the description) but prints texts of several lines (the subcommand
    list in the epilog) as written, so its columns stay aligned."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _threads(text: str) -> Any:
    return "auto" if text == "auto" else nonneg_int(text)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
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
            text = str(value) if kind == "int" else json.dumps(str(value))
        items.append(f"swap.{key}={text}")
    if swap_given:
        items.append("swap.enabled=true")
    return items


def make_plan(args: argparse.Namespace, script: Optional[List[str]]) -> Plan:
    config = None
    launch: Any = None
    if args.config is not None:
        # Only with a config: loading it imports torch (model zoo), seconds that script mode without
        # a config need not spend before mpirun starts.
        from .config import load_config

        config = load_config(args.config, config_overrides(args))
        launch = config.launch
    plan = Plan(args, script, config, np=args.np or (launch.np if launch else 1),
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
        from .input_checks import check_hosts_resolve
        from .mpi_command import parse_hostfile, parse_hosts

        hosts = parse_hosts(plan.hosts) if plan.hosts else parse_hostfile(plan.hostfile)  # type: ignore[arg-type]
        check_hosts_resolve([h.name for h in hosts], "-H" if plan.hosts else f"--hostfile {plan.hostfile}")
    plan.rank_env = rank_environment(plan)
    return plan


def rank_environment(plan: Plan) -> Dict[str, str]:
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


def script_swap_env(plan: Plan) -> Dict[str, str]:
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


def rank_program(plan: Plan) -> List[str]:
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


def tcp_include(plan: Plan) -> Optional[str]:
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


def mpi_command(plan: Plan) -> tuple:
    """(argv, flavour, environment for mpirun)."""
    from .mpi_command import MPIRequest, build_command, find_mpirun, rank_hosts

    mpirun, flavor = find_mpirun()
    request = MPIRequest(np=plan.np, program=rank_program(plan), hosts=plan.hosts, hostfile=plan.hostfile,
                         mpi_args=plan.mpi_args, oversubscribe=plan.oversubscribe, set_env=plan.rank_env,
                         inherit_env=os.environ, tcp_include=tcp_include(plan))
    argv = build_command(request, mpirun=mpirun, flavor=flavor, is_root=os.geteuid() == 0)
    return argv, flavor, {**os.environ, **plan.rank_env}, rank_hosts(request)


# --------------------------------------------------------------------------------------------
# running


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = dispatch(argv)
    except UserError as exc:
        print(f"lmsrun: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if code is not None:
        return code
    script: Optional[List[str]] = None
    if "--" in argv:
        cut = argv.index("--")
        argv, script = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if script is not None and not script:
            raise UserError("nothing after '--'", hint="e.g. lmsrun -np 2 -- python train.py")
        if args.config is None and script is None:
            raise UserError("a CONFIG file is required (or a command after '--' for script mode)",
                            hint="lmsrun configs/quickstart.yaml, or lmsrun -np 2 -- python train.py")
        return run(args, script)
    except UserError as exc:
        print(f"lmsrun: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


def run(args: argparse.Namespace, script: Optional[List[str]]) -> int:
    from lmsdp.runtime.topology import detect_launched

    plan = make_plan(args, script)
    topology = detect_launched()
    if plan.config is not None:
        from .strategy_checks import check_strategy

        check_strategy(plan.config, topology.size if topology is not None else plan.np)
    if topology is not None:  # we are a rank already
        if args.np and args.np != topology.size:
            raise TopologyError(f"-np {args.np} was given but {topology.source} started {topology.size} ranks",
                                hint="drop -np when lmsrun runs under mpirun/srun/torchrun")
        if args.dry_run:
            print(f"# in place: {topology.describe()}")
            return _print_config(plan)
        if plan.script_mode:
            return exec_script(plan)
        from .rank import run_rank

        return run_rank(plan.config, topology)
    if not plan.script_mode and plan.np == 1 and not (plan.hosts or plan.hostfile):
        if args.dry_run:
            print("# 1 rank on this machine: runs in this process, no mpirun")
            return _print_config(plan)
        from lmsdp.runtime.topology import detect_topology

        from .rank import run_rank
        from .rank_log import tee_rank_log

        with tee_rank_log(args.output_dir):  # rank0.log, as the demux writes for mpirun jobs
            return run_rank(plan.config, detect_topology())
    if plan.config is not None and not args.dry_run:  # refused before mpirun starts (rank 0 holds it later)
        from .checkpoint_lock import check_free

        check_free(plan.config.checkpoint_dir)
    argv, flavor, env, hosts_of_ranks = mpi_command(plan)
    if args.dry_run:
        print(shlex.join(argv))
        return _print_config(plan)
    from .spawn import Job, run_job

    keep_errors_in = plan.config.output_dir if plan.config is not None else args.output_dir
    return run_job(Job(command=argv, env=env, flavor=flavor, output_dir=args.output_dir,
                       keep_errors_in=keep_errors_in, graceful_signal=None if plan.script_mode else signal.SIGUSR1,
                       stop_timeout=args.stop_timeout, verbose=args.verbose, np=plan.np,
                       rank_hosts=hosts_of_ranks))


def _print_config(plan: Plan) -> int:
    if plan.config is not None:
        from .config import dump_config

        print(f"# resolved config ({plan.config.source})")
        sys.stdout.write(dump_config(plan.config))
    else:
        print("# script mode: no config")
    return 0


def exec_script(plan: Plan) -> int:
    """Script mode inside an existing rank: replace this process with the user's command."""
    from .rank import exec_program

    env = {**os.environ, **{k: v for k, v in plan.rank_env.items()
                            if k not in (envvars.LAUNCHED, envvars.EXPECTED_NP)}}
    return exec_program(rank_program(plan), env)


if __name__ == "__main__":
    sys.exit(main())
