"""The mpirun command lmsrun builds: ``--dry-run`` output asserted exactly, plus the pure builder."""
import os
import shutil
import subprocess
import sys

import pytest

from lmsdp.launcher.config import dump_config, load_config
from lmsdp.launcher.config.errors import UserError
from lmsdp.launcher.launch.mpi_command import MPIRequest, build_command, parse_hostfile, parse_hosts

from tests.support import HERE
SCRIPTS = os.path.join(HERE, "scripts")
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)  # the config's model.factory, for load_config in this process
TINY = os.path.join(SCRIPTS, "tiny.yaml")
PY = sys.executable
from tests.support import LMSRUN
SITE = os.path.join(os.path.dirname(HERE), "launcher", "launch", "script_mode")
ROOT = "--allow-run-as-root " if os.geteuid() == 0 else ""
# A fixed environment, so the -x list is known: PATH and PYTHONPATH (for the test model factory).
ENV = {"PATH": f"{os.path.dirname(PY)}:/usr/bin:/bin", "PYTHONPATH": SCRIPTS, "HOME": os.environ.get("HOME", "/")}
BASE_X = "-x PATH -x PYTHONPATH -x PYTHONUNBUFFERED=1"

pytestmark = pytest.mark.skipif(shutil.which("mpirun", path=ENV["PATH"]) is None, reason="mpirun not installed")


def dry_run(*args: str, env=None):
    proc = subprocess.run([LMSRUN, "--dry-run", *args], env=env or ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def resolved(path: str, *overrides: str) -> str:
    return f"# resolved config ({path})\n" + dump_config(load_config(path, list(overrides)))


def worker(*args: str) -> str:
    return f"{PY} -m lmsdp.launcher.cli {TINY}" + "".join(" " + a for a in args)


@pytest.mark.integration
def test_dry_run_default_np_from_config():
    out = dry_run(TINY)
    assert out == (f"/usr/bin/mpirun {ROOT}-np 2 --map-by slot --bind-to none --tag-output {BASE_X} "
                   f"-x LMSDP_EXPECTED_NP=2 -x LMSDP_LAUNCHED=1 {worker()}\n" + resolved(TINY))


@pytest.mark.integration
def test_dry_run_hosts():
    out = dry_run(TINY, "-np", "4", "-H", "localhost:2,node2:2", "--set", "train.steps=3")
    assert out == (f"/usr/bin/mpirun {ROOT}-np 4 -H localhost:2,node2:2 --map-by slot --bind-to none --tag-output "
                   f"{BASE_X} -x LMSDP_EXPECTED_NP=4 -x LMSDP_LAUNCHED=1 {worker('--set', 'train.steps=3')}\n"
                   + resolved(TINY, "train.steps=3"))


@pytest.mark.integration
def test_dry_run_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=2\nnode2 slots=2\n")
    out = dry_run(TINY, "-np", "3", "--hostfile", str(hostfile))
    assert out == (f"/usr/bin/mpirun {ROOT}-np 3 --hostfile {hostfile} --map-by slot --bind-to none --tag-output "
                   f"{BASE_X} -x LMSDP_EXPECTED_NP=3 -x LMSDP_LAUNCHED=1 {worker()}\n" + resolved(TINY))


@pytest.mark.integration
def test_dry_run_mpi_args_replace_our_binding_and_come_last():
    out = dry_run(TINY, "--mpi-args", "--mca btl tcp,self --bind-to core", "--output-dir", "/tmp/o",
                  "--swap-threshold", "1MiB")
    first = out.splitlines()[0]
    assert first == (f"/usr/bin/mpirun {ROOT}-np 2 --map-by slot --tag-output {BASE_X} -x LMSDP_EXPECTED_NP=2 "
                     f"-x LMSDP_LAUNCHED=1 --mca btl tcp,self --bind-to core "
                     f"{worker('--output-dir', '/tmp/o', '--swap-threshold', '1MiB')}")
    config = load_config(TINY, ['train.output_dir="/tmp/o"', 'swap.threshold="1MiB"', "swap.enabled=true"])
    assert config.swap.threshold == 1 << 20 and config.output_dir == "/tmp/o"
    assert out == first + "\n" + f"# resolved config ({TINY})\n" + dump_config(config)


@pytest.mark.integration
def test_dry_run_oversubscribes_only_beyond_local_cores():
    from lmsdp.launcher.launch.mpi_command import physical_cores

    many = physical_cores() + 1
    assert "--oversubscribe" in dry_run(TINY, "-np", str(many)).splitlines()[0]
    assert "--oversubscribe" not in dry_run(TINY, "-np", "1", "-H", "localhost:1").splitlines()[0]
    assert "--oversubscribe" in dry_run(TINY, "-np", "1", "-H", "localhost:1", "--oversubscribe").splitlines()[0]


@pytest.mark.integration
def test_dry_run_script_mode_without_config():
    out = dry_run("-np", "2", "--swap-threshold", "256KiB", "--swap-prefetch", "3", "--swap-recompute", "relu,pool",
                  "--swap-link-gbps", "2", "--", "python", "train.py", "--lr", "0.1")
    assert out == (f"/usr/bin/mpirun {ROOT}-np 2 --map-by slot --bind-to none --tag-output -x PATH "
                   f"-x PYTHONPATH={SITE}:{SCRIPTS} -x PYTHONUNBUFFERED=1 -x LMSDP_EXPECTED_NP=2 -x LMSDP_LAUNCHED=1 "
                   "-x LMSDP_SWAP=1 -x LMSDP_SWAP_LINK_GBPS=2.0 -x LMSDP_SWAP_PREFETCH=3 -x LMSDP_SWAP_RECOMPUTE=relu,pool "
                   f"-x LMSDP_SWAP_THRESHOLD=256KiB -x OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // 2)} "
                   f"{PY} train.py --lr 0.1\n# script mode: no config\n")


@pytest.mark.integration
def test_dry_run_single_rank_runs_in_place():
    out = dry_run(TINY, "-np", "1")
    assert out.splitlines()[0] == "# 1 rank on this machine: runs in this process, no mpirun"


@pytest.mark.parametrize("args,words", [
    ([TINY, "-np", "5", "-H", "a:2,b:2"], "-np 5 is more than the 4 slot(s) in -H"),
    ([TINY, "-H", "a:2", "--hostfile", "/etc/hostname"], "-H and --hostfile are both given"),
    ([TINY, "--hostfile", "/no/such/file"], "--hostfile: file not found"),
    ([TINY, "-H", "a:x"], "expected host:slots"),
    ([], "a CONFIG file is required"),
    ([TINY, "--"], "nothing after '--'"),
    ([TINY, "--set", "launch.np=0"], "launch.np: must be >= 1"),
])
def test_launch_errors_are_one_line(args, words, capsys):
    from lmsdp.launcher.cli import main

    assert main(["--dry-run", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmsrun: error: ") and words in lines[0], err


# ---- the pure builder: root flags and other MPIs without depending on who runs the test

@pytest.mark.integration
def test_build_command_root_and_not_root():
    req = MPIRequest(np=2, program=["python", "t.py"], set_env={"LMSDP_LAUNCHED": "1"}, inherit_env={"PATH": "/b"})
    tail = ["-np", "2", "--map-by", "slot", "--bind-to", "none", "--tag-output", "-x", "PATH",
            "-x", "LMSDP_LAUNCHED=1", "python", "t.py"]
    assert build_command(req, is_root=True, local_cores=8) == ["mpirun", "--allow-run-as-root"] + tail
    assert build_command(req, is_root=False, local_cores=8) == ["mpirun"] + tail
    assert "--oversubscribe" in build_command(req, local_cores=1)


@pytest.mark.integration
def test_build_command_hydra():
    req = MPIRequest(np=4, program=["python", "t.py"], hosts="n1:2,n2:2", mpi_args="-ppn 2",
                     set_env={"LMSDP_LAUNCHED": "1"}, inherit_env={"PATH": "/b", "NCCL_DEBUG": "INFO", "X": "y"})
    assert build_command(req, mpirun="mpiexec", flavor="mpich", local_cores=8) == [
        "mpiexec", "-n", "4", "-hosts", "n1:2,n2:2", "-bind-to", "none", "-prepend-rank",
        "-genv", "LMSDP_LAUNCHED", "1", "-genvlist", "PATH,NCCL_DEBUG", "-ppn", "2", "python", "t.py"]


def test_parse_hosts_and_hostfile(tmp_path):
    assert [(h.name, h.slots) for h in parse_hosts("a:2, b ,c:4")] == [("a", 2), ("b", 1), ("c", 4)]
    path = tmp_path / "hf"
    path.write_text("a slots=2\nb:3  # comment\nc\n\n")
    assert [(h.name, h.slots) for h in parse_hostfile(str(path))] == [("a", 2), ("b", 3), ("c", 1)]
    with pytest.raises(UserError):
        parse_hosts("a:0")
