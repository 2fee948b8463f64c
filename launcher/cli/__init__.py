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
import os
import shlex
import signal
import sys
from typing import Any, List, Optional

from lmsdp.runtime import env as envvars

from lmsdp.launcher.config.errors import TopologyError, UserError
from lmsdp.launcher.launch.flags import build_parser
from lmsdp.launcher.launch.launch_plan import LaunchPlan, make_plan, mpi_command, rank_program

from .boundary import guarded
from .subcommands import dispatch, epilog



def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _main(argv))


def _main(argv: List[str]) -> int:
    code = dispatch(argv)
    if code is not None:
        return code
    script: Optional[List[str]] = None
    if "--" in argv:
        cut = argv.index("--")
        argv, script = argv[:cut], argv[cut + 1:]
    args = build_parser(epilog()).parse_args(argv)
    if script is not None and not script:
        raise UserError("nothing after '--'", hint="e.g. lmsrun -np 2 -- python train.py")
    if args.config is None and script is None:
        raise UserError("a CONFIG file is required (or a command after '--' for script mode)",
                        hint="lmsrun configs/quickstart.yaml, or lmsrun -np 2 -- python train.py")
    return run(args, script)


def run(args: argparse.Namespace, script: Optional[List[str]]) -> int:
    from lmsdp.runtime.abort import ends_job_on_failure
    from lmsdp.runtime.topology import detect_launched

    topology = detect_launched()
    if not ends_job_on_failure(topology) or args.dry_run:
        return _run(args, script, topology)
    from lmsdp.launcher.train.rank import failure_ends_rank

    with failure_ends_rank(topology):  # a config or import error on one srun task ends the step
        return _run(args, script, topology)


def _run(args: argparse.Namespace, script: Optional[List[str]], topology: Any) -> int:
    plan = make_plan(args, script)
    if plan.config is not None:
        from lmsdp.launcher.train.strategy_checks import check_strategy

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
        from lmsdp.launcher.train.rank import run_rank

        return run_rank(plan.config, topology)
    if not plan.script_mode and plan.np == 1 and not (plan.hosts or plan.hostfile):
        if args.dry_run:
            print("# 1 rank on this machine: runs in this process, no mpirun")
            return _print_config(plan)
        from lmsdp.runtime.topology import detect_topology

        from lmsdp.launcher.train.rank import run_rank
        from lmsdp.launcher.launch.rank_log import tee_rank_log

        with tee_rank_log(args.output_dir):  # rank0.log, as the demux writes for mpirun jobs
            return run_rank(plan.config, detect_topology())
    if plan.config is not None and not args.dry_run:  # refused before mpirun starts (rank 0 holds it later)
        from lmsdp.launcher.train.checkpoint_lock import check_free

        check_free(plan.config.checkpoint_dir)
    argv, flavor, env, hosts_of_ranks = mpi_command(plan)
    if args.dry_run:
        print(shlex.join(argv))
        return _print_config(plan)
    from lmsdp.launcher.launch.spawn import Job, run_job

    keep_errors_in = plan.config.output_dir if plan.config is not None else args.output_dir
    return run_job(Job(command=argv, env=env, flavor=flavor, output_dir=args.output_dir,
                       keep_errors_in=keep_errors_in, graceful_signal=None if plan.script_mode else signal.SIGUSR1,
                       stop_timeout=args.stop_timeout, verbose=args.verbose, np=plan.np,
                       rank_hosts=hosts_of_ranks))


def _print_config(plan: LaunchPlan) -> int:
    if plan.config is not None:
        from lmsdp.launcher.config import dump_config

        print(f"# resolved config ({plan.config.source})")
        sys.stdout.write(dump_config(plan.config))
    else:
        print("# script mode: no config")
    return 0


def exec_script(plan: LaunchPlan) -> int:
    """Script mode inside an existing rank: replace this process with the user's command."""
    from lmsdp.launcher.train.rank import exec_program

    env = {**os.environ, **{k: v for k, v in plan.rank_env.items()
                            if k not in (envvars.LAUNCHED, envvars.EXPECTED_NP)}}
    return exec_program(rank_program(plan), env)


