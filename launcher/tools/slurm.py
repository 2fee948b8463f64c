"""``lmsrun slurm CONFIG --nodes N --gpus-per-node G [...]``: fill an sbatch template, print or submit it.

Templates live in the repository's ``slurm/`` folder (installed as ``lmsdp/launcher/templates``):
``srun_single_node.sbatch`` (one node, ``srun --mpi=pmix``), ``srun_multi_node.sbatch`` (several nodes,
the same) and ``mpirun.sbatch`` (``mpirun`` inside the allocation). Placeholders are ``{{name}}``; an
``#SBATCH`` line whose placeholder has no value (no partition, no GPUs, ...) is left out, and so are
``#@`` lines (notes for people who copy a template by hand).

Every generated script passes ``--set train.resume=true``, so a requeued or resubmitted job continues
from the newest checkpoint, and exports ``LMSDP_EXPECTED_NP`` so a rank started with the wrong task
count stops with a clear error instead of hanging.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from lmsdp.runtime.error_file import KEPT_SUBDIR

from lmsdp.launcher.config import Config, load_config
from lmsdp.launcher.config.argtypes import OneLineParser
from lmsdp.launcher.config.errors import UserError

TEMPLATES = {"single": "srun_single_node.sbatch", "multi": "srun_multi_node.sbatch", "mpirun": "mpirun.sbatch"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")


class SlurmError(UserError):
    """A flag or config value for ``lmsrun slurm`` is unusable, or sbatch refused the script."""


@dataclass
class SlurmJob:
    """Everything a template needs, resolved from the config and the flags."""

    config_path: str
    job_name: str
    workdir: str
    output_dir: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: Optional[int]
    time: str
    partition: Optional[str]
    account: Optional[str]
    launcher: str
    signal_seconds: int
    requeue: bool
    lmsrun: str
    overrides: List[str]

    @property
    def expected_np(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def log_path(self) -> str:
        return os.path.join(self.output_dir, "slurm-%j.out")

    @property
    def error_dir(self) -> str:
        """Where failing tasks write rank<R>.json (``LMSDP_ERROR_DIR``): the folder lmsrun keeps a
        failed job's errors in when it launches the ranks itself."""
        return os.path.join(self.output_dir, KEPT_SUBDIR)

    @property
    def template(self) -> str:
        if self.launcher == "mpirun":
            return TEMPLATES["mpirun"]
        return TEMPLATES["single"] if self.nodes == 1 else TEMPLATES["multi"]

    def values(self) -> Dict[str, Optional[str]]:
        """Placeholder -> text; None leaves an optional #SBATCH line out."""
        set_args = " ".join(f"--set {shlex.quote(item)}" for item in [*self.overrides, "train.resume=true"])
        return {
            "job_name": self.job_name,
            "log_path": self.log_path,
            "workdir": self.workdir,
            "nodes": str(self.nodes),
            "tasks_per_node": str(self.tasks_per_node),
            "cpus_per_task": str(self.cpus_per_task) if self.cpus_per_task else None,
            "gpus_per_node": str(self.gpus_per_node) if self.gpus_per_node > 0 else None,
            "time": self.time,
            "partition": self.partition or None,
            "account": self.account or None,
            "signal_seconds": str(self.signal_seconds) if self.signal_seconds > 0 else None,
            "requeue_option": "requeue" if self.requeue else "no-requeue",
            "requeue": "1" if self.requeue else "0",
            "lmsrun": shlex.quote(self.lmsrun),
            "config": shlex.quote(self.config_path),
            "expected_np": str(self.expected_np),
            "error_dir": shlex.quote(self.error_dir),
            "set_args": set_args,
        }


# --------------------------------------------------------------------------------------------
# templates


def template_dirs() -> List[Path]:
    """Where templates are looked for: the installed package data, then the source tree's slurm/."""
    launcher = Path(__file__).resolve().parent.parent  # lmsdp/launcher (this module is in launcher/tools)
    return [launcher / "templates", launcher.parent / "slurm"]


def load_template(name: str) -> str:
    for folder in template_dirs():
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise SlurmError(f"sbatch template {name} not found in {', '.join(str(d) for d in template_dirs())}",
                     hint="reinstall lmsdp (the templates ship as package data)")


def render(text: str, values: Dict[str, Optional[str]]) -> str:
    """Replace ``{{name}}``; drop ``#SBATCH`` lines whose placeholder is None and ``#@`` template notes;
    unknown names are errors."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#@"):
            continue
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise SlurmError(f"template placeholder {{{{{unknown[0]}}}}} has no value")
        if any(values[n] is None for n in names):
            if line.startswith("#SBATCH"):
                continue
            if not line.lstrip().startswith("#"):
                raise SlurmError(f"template line needs a value: {line.strip()}")
            line = _PLACEHOLDER.sub(lambda m: values[m.group(1)] or "-", line)
        else:
            line = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line)
        out.append(line)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# flags -> job


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lmsrun slurm",
        description="Write (or submit) an sbatch script that trains CONFIG on a Slurm allocation: one task "
                    "per GPU, a checkpoint on preemption/time limit, optional self-requeue, resume on restart. "
                    "Flags default to the config's slurm section.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--nodes", type=int, help="nodes to allocate (slurm.nodes)")
    parser.add_argument("--gpus-per-node", type=int, dest="gpus_per_node",
                        help="GPUs = tasks per node; 0: CPU nodes with launch.np tasks each (slurm.gpus_per_node)")
    parser.add_argument("--time", help="wall-time limit, e.g. 02:00:00 or 1-00:00:00 (slurm.time)")
    parser.add_argument("--partition", help="sbatch --partition (slurm.partition)")
    parser.add_argument("--account", help="sbatch --account (slurm.account)")
    parser.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=None,
                        help="requeue the job after a preemption/time-limit checkpoint (slurm.requeue)")
    parser.add_argument("--launcher", choices=("srun", "mpirun"),
                        help="start ranks with srun --mpi=pmix or mpirun inside the allocation (slurm.launcher)")
    parser.add_argument("--signal-seconds", type=int, dest="signal_seconds",
                        help="seconds before the time limit that USR1 asks for a checkpoint; 0: none "
                             "(slurm.signal_seconds)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the script to FILE instead of stdout")
    parser.add_argument("--submit", action="store_true",
                        help="submit with sbatch and print the job id (the script is kept in --output FILE, "
                             "default <output_dir>/<name>.sbatch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key here and in the job (repeatable)")
    return parser


def find_lmsrun() -> str:
    """The lmsrun next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "lmsrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("lmsrun")
    if found:
        return os.path.abspath(found)
    raise SlurmError("cannot find the lmsrun command next to this Python or on PATH",
                     hint="install lmsdp (pip install -e .) into the environment the job should use")


def job_from_args(args: argparse.Namespace, config: Config, cwd: Optional[str] = None) -> SlurmJob:
    """Merge flags over the config's slurm section and check the result."""
    cwd = os.path.abspath(cwd or os.getcwd())
    s = config.slurm
    nodes = s.nodes if args.nodes is None else args.nodes
    gpus = s.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    signal_seconds = s.signal_seconds if args.signal_seconds is None else args.signal_seconds
    time_limit = (args.time or s.time).strip()
    if nodes < 1:
        raise SlurmError(f"--nodes must be 1 or more, got {nodes}")
    if gpus < 0:
        raise SlurmError(f"--gpus-per-node must be 0 (CPU) or more, got {gpus}")
    if signal_seconds < 0 or signal_seconds > 65535:
        raise SlurmError(f"--signal-seconds must be between 0 and 65535, got {signal_seconds}")
    if not _TIME.match(time_limit):
        raise SlurmError(f"--time {time_limit!r} is not a Slurm time",
                         hint="use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    limit = time_seconds(time_limit)
    if signal_seconds and limit and signal_seconds >= limit:
        raise SlurmError(f"the checkpoint signal ({signal_seconds} s before the end) does not fit in --time "
                         f"{time_limit} ({limit} s)", hint="lower --signal-seconds or raise --time")
    config_path = os.path.abspath(os.path.join(cwd, config.source)) if config.source else ""
    if not config_path:
        raise SlurmError("a config file is required")
    output_dir = config.output_dir
    return SlurmJob(
        config_path=config_path,
        job_name=re.sub(r"\s+", "_", config.name.strip()) or "lmsdp",
        workdir=cwd,
        output_dir=os.path.normpath(os.path.join(cwd, output_dir)),
        nodes=nodes,
        gpus_per_node=gpus,
        tasks_per_node=gpus if gpus > 0 else config.launch.np,
        cpus_per_task=config.launch.threads or None,
        time=time_limit,
        partition=args.partition if args.partition is not None else s.partition,
        account=args.account if args.account is not None else s.account,
        launcher=args.launcher or s.launcher,
        signal_seconds=signal_seconds,
        requeue=s.requeue if args.requeue is None else args.requeue,
        lmsrun=find_lmsrun(),
        overrides=list(args.overrides),
    )


def time_seconds(text: str) -> int:
    """Seconds in a Slurm time string (0 for 'unlimited'-like values we do not parse)."""
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        days = int(head)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def generate(job: SlurmJob) -> str:
    """The filled-in sbatch script for ``job``."""
    return render(load_template(job.template), job.values())


def submit(script_path: str, env: Optional[Dict[str, str]] = None) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise SlurmError("sbatch not found on PATH", hint="run this on a Slurm login node, or drop --submit")
    proc = subprocess.run([sbatch, "--parsable", script_path], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SlurmError(f"sbatch refused {script_path}: {reason}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lmsrun slurm``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        job = job_from_args(args, config)
        script = generate(job)
        os.makedirs(job.output_dir, exist_ok=True)  # Slurm does not create the log's folder
        path = args.output
        if args.submit and not path:
            path = os.path.join(job.output_dir, f"{job.job_name}.sbatch")
        if path:
            path = os.path.abspath(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(script)
            os.chmod(path, 0o755)
        if not args.submit:
            if path:
                print(f"lmsrun slurm: wrote {path} ({job.template}); submit with: sbatch {path}", file=sys.stderr)
            else:
                sys.stdout.write(script)
            return 0
        job_id = submit(path)
        print(job_id, flush=True)
        print(f"lmsrun slurm: submitted job {job_id} ({path}); watch: squeue -j {job_id}; "
              f"log: {job.log_path.replace('%j', job_id)}", file=sys.stderr)
        return 0
    except OSError as exc:
        raise UserError(str(exc)) from None
