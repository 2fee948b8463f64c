"""Several hosts, for real: ranks on network-namespace hosts (tests/netns_cluster.py), each with its own
address, hostname and /tmp, launched by lmsrun through Open MPI from the root namespace (a login node).

One cluster per module (two hosts, two slots each); every job is tiny and short. The fault cases print
their measured times (``-s`` shows them)."""
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.netns_cluster import started
from tests.support import ENV, LMSRUN, REPO, TINY, Run, metric_lines

pytestmark = [pytest.mark.integration, pytest.mark.mpi]
BOUND_S = 30  # a fault must end the job within this (start-up of 4 ranks on 2 busy cores included)


@pytest.fixture(scope="module")
def cluster():
    yield from started(2)


def lmsrun(cluster, *args, np=4, slots=2, timeout=240, env=None):
    """lmsrun on the cluster's hosts (hostfile by address, Open MPI through the rsh agent)."""
    argv = [LMSRUN, *args, "--hostfile", cluster.hostfile(slots), "-np", str(np)]
    return subprocess.run(argv, cwd=REPO, env=cluster.env(env or ENV), capture_output=True, text=True,
                          timeout=timeout)


def shared_dir(cluster, name):
    """A folder every host sees (under the cluster's folder, outside any host's /tmp)."""
    path = os.path.join(cluster.folder, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def assert_hosts_idle(cluster, within=10.0):
    """Nothing of the job is left on any host (processes in the hosts' network namespaces)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = {h.name: cluster.pids(h) for h in cluster.hosts}
        if not any(left.values()):
            return
        time.sleep(0.2)
    details = {name: [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:80] for p in pids
                      if os.path.exists(f"/proc/{p}")] for name, pids in left.items()}
    raise AssertionError(f"left running on the hosts: {details}")


# --- 1. the cluster itself -------------------------------------------------------------------------

def test_hosts_have_their_own_name_address_and_tmp(cluster):
    seen = {}
    for host in cluster.hosts:
        out = cluster.run_on(host, ["sh", "-c", "hostname; ip -4 -o addr show eth0; echo x > /tmp/mine; ls /tmp"],
                             capture_output=True, text=True, timeout=30).stdout.split("\n")
        seen[host.name] = out
        assert out[0] == host.name and host.address in out[1]
    assert not os.path.exists("/tmp/mine")  # each host's /tmp is its own, not the machine's


# --- 2. addresses chosen, never guessed ------------------------------------------------------------

def test_open_mpi_is_restricted_to_the_network_that_joins_the_hosts(cluster):
    out = lmsrun(cluster, TINY, "--dry-run").stdout.splitlines()[0]
    argv = shlex.split(out)
    for param in ("btl_tcp_if_include", "oob_tcp_if_include"):
        assert argv[argv.index(param) + 1] == cluster.cidr, out  # auto: the bridge's network
    named = shlex.split(lmsrun(cluster, TINY, "--dry-run", "--set", "comm.interface=eth0").stdout.splitlines()[0])
    assert named[named.index("btl_tcp_if_include") + 1] == "eth0"


def test_bad_interface_is_one_line(cluster):
    run = lmsrun(cluster, TINY, "--set", "comm.interface=10.0.0.0/33", np=2, slots=1)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("lmsrun: error: comm.interface: '10.0.0.0/33'")


def test_interface_that_no_host_has_is_named_with_the_host(cluster):
    """comm.interface names a network the hosts are not on: one line naming a host, not a hang."""
    run = lmsrun(cluster, TINY, "--set", "comm.backend=torch", "--set", "comm.interface=10.255.255.0/24",
                 "--output-dir", shared_dir(cluster, "no-interface"),
                 "--mpi-args", f"--mca btl_tcp_if_include {cluster.cidr} --mca oob_tcp_if_include {cluster.cidr}",
                 np=2, slots=1)
    assert run.returncode != 0
    assert "no interface on host h1 matches '10.255.255.0/24'" in run.stderr, run.stderr[-3000:]
    assert_hosts_idle(cluster)


def test_unreachable_store_is_one_line_naming_the_hosts_within_the_timeout(cluster):
    """Rank 0's store advertised at an address nobody has (LMSDP_MASTER_ADDR, a free address of the
    hosts' network): the other ranks fail naming their host and rank 0's, within comm.timeout_s."""
    nobody = str(list(cluster.network.hosts())[-1])
    started = time.monotonic()
    run = lmsrun(cluster, TINY, "--set", "comm.backend=torch", "--set", "comm.timeout_s=5",
                 "--output-dir", shared_dir(cluster, "unreachable"), np=2, slots=1,
                 env={**ENV, "LMSDP_MASTER_ADDR": nobody})
    took = time.monotonic() - started
    print(f"\nunreachable store: job ended in {took:.1f} s (timeout 5 s)")
    assert run.returncode != 0
    assert f"cannot reach rank 0's store at {nobody}" in run.stderr and "on host h2" in run.stderr, run.stderr[-3000:]
    assert_hosts_idle(cluster)


# --- 6. exactness across hosts (also: the torch backend works across hosts, both strategies) --------

def _final_state(folder):
    from lmsdp.launcher.train.checkpoint import CheckpointManager

    _path, state = CheckpointManager(folder, 3).load_latest()
    return state["model"]


@pytest.mark.parametrize("backend,strategy,per_host", [("torch", "replicate", 2), ("horovod", "replicate", 1),
                                                       ("torch", "shard", 1)])
def test_ranks_across_hosts_match_the_same_ranks_on_one_host(cluster, backend, strategy, per_host):
    """2 hosts x ``per_host`` ranks against one host with all of them: the same losses and weights, bit
    for bit. 2 x 2 (inter- and intra-host links in one ring) for the torch replicate path; the other two
    run 2 x 1, which crosses the hosts just the same at half the CPU of four ranks on two cores."""
    if backend == "horovod":
        pytest.importorskip("horovod.torch")
    world = 2 * per_host
    common = ("--set", f"comm.backend={backend}", "--set", f"comm.strategy={strategy}", "--set", "train.steps=3",
              "--set", "train.deterministic=true", "--set", "swap.enabled=true", "--set", "swap.threshold=1KiB",
              "--set", "swap.keep_last=0", "--set", "launch.threads=1")  # threads follow ranks per host otherwise
    losses, weights = {}, {}
    for layout in ("hosts", "one"):
        out = shared_dir(cluster, f"exact-{backend}-{strategy}-{layout}")
        if layout == "one":  # one host with every slot: the first host only
            hostfile = os.path.join(cluster.folder, f"one-host-{world}")
            with open(hostfile, "w", encoding="utf-8") as handle:
                handle.write(f"{cluster.hosts[0].address} slots={world}\n")
            argv = [LMSRUN, TINY, *common, "--output-dir", out, "--hostfile", hostfile, "-np", str(world)]
            run = subprocess.run(argv, cwd=REPO, env=cluster.env(ENV), capture_output=True, text=True, timeout=300)
        else:
            run = lmsrun(cluster, TINY, *common, "--output-dir", out, np=world, slots=per_host, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[layout] = [m["loss"] for m in metric_lines(os.path.join(out, "metrics.rank0.jsonl")) if "loss" in m]
        if strategy == "replicate":
            weights[layout] = _final_state(os.path.join(out, "checkpoints"))
    assert len(losses["hosts"]) == 3 and losses["hosts"] == losses["one"]
    if strategy == "replicate":
        assert weights["hosts"].keys() == weights["one"].keys()
        for key in weights["hosts"]:
            assert torch.equal(weights["hosts"][key], weights["one"][key]), key
    assert_hosts_idle(cluster)


# --- 3. outputs where the user can find them --------------------------------------------------------

def test_output_folder_not_shared_is_said_once_and_resume_says_why_it_finds_nothing(cluster):
    out = "/tmp/lmsdp-multihost-not-shared"  # every host (and lmsrun's) has its own /tmp
    first = lmsrun(cluster, TINY, "--output-dir", out, "--set", "train.steps=2", np=2, slots=1)
    assert first.returncode == 0, first.stderr[-3000:]
    said = [l for l in first.stderr.splitlines() if "is not the same folder on every host" in l]
    assert len(said) == 1 and "are on host h1 (rank 0): /tmp/lmsdp-multihost-not-shared" in said[0], first.stderr
    assert os.path.exists(os.path.join(cluster.hosts[0].tmp, "lmsdp-multihost-not-shared", "summary.json"))
    # the same job resumed with the hosts swapped: rank 0 is now on h2, whose /tmp holds no checkpoint
    swapped = os.path.join(cluster.folder, "swapped")
    with open(swapped, "w", encoding="utf-8") as handle:
        handle.write(f"{cluster.hosts[1].address} slots=1\n{cluster.hosts[0].address} slots=1\n")
    again = subprocess.run([LMSRUN, TINY, "--output-dir", out, "--set", "train.steps=2", "--resume",
                            "--hostfile", swapped, "-np", "2"], cwd=REPO, env=cluster.env(ENV),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--resume: no checkpoint in /tmp/lmsdp-multihost-not-shared/checkpoints on host h2 (rank 0)" in again.stderr
    assert "not shared" in again.stderr
    shutil.rmtree(os.path.join(cluster.hosts[0].tmp, "lmsdp-multihost-not-shared"), ignore_errors=True)
    shutil.rmtree(os.path.join(cluster.hosts[1].tmp, "lmsdp-multihost-not-shared"), ignore_errors=True)


def test_sharded_checkpoints_on_a_folder_not_shared_are_refused_before_training(cluster):
    run = lmsrun(cluster, TINY, "--output-dir", "/tmp/lmsdp-multihost-shard", "--set", "comm.backend=torch",
                 "--set", "comm.strategy=shard", np=2, slots=1)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [l for l in run.stderr.splitlines() if l.startswith("lmsrun: error:")]
    assert len(errors) == 1 and "train.checkpoint_dir: /tmp/lmsdp-multihost-shard/checkpoints is not the same " \
                                "folder on every host" in errors[0], run.stderr[-3000:]
    assert "step 1/" not in run.stderr + run.stdout


# --- 4. failures across hosts ----------------------------------------------------------------------

SLOW = ("--set", "train.steps=400", "--set", "model.kwargs.delay=0.05")


@pytest.mark.parametrize("fail", ["raise", "exit", "kill"])
def test_a_remote_rank_failing_is_named_with_its_host(cluster, fail):
    """Rank 1 (on h2, whose /tmp does not hold lmsrun's error folder) fails at its 3rd step."""
    started = time.monotonic()
    run = lmsrun(cluster, TINY, "--set", f"model.kwargs.fail={fail}", "--set", "model.kwargs.fail_rank=1",
                 "--set", "train.steps=20", "--output-dir", shared_dir(cluster, f"fail-{fail}"), np=2, slots=1)
    took = time.monotonic() - started
    print(f"\nremote rank 1 {fail}: lmsrun returned {run.returncode} after {took:.1f} s (whole job, start-up included)")
    assert run.returncode != 0
    report = [l for l in run.stderr.splitlines() if l.startswith("lmsrun: rank")]
    assert report and report[0].startswith("lmsrun: rank 1 on host "), run.stderr[-3000:]
    host = report[0].split(" on host ")[1].split()[0]
    assert host in ("h2", cluster.hosts[1].address), report
    if fail == "raise":  # the error file came over mpirun's output: the traceback is kept
        assert "RuntimeError: injected failure at step 3" in report[0]
        kept = os.path.join(cluster.folder, "fail-raise", "errors", "rank1.json")
        assert os.path.exists(kept), run.stderr[-2000:]
    assert_hosts_idle(cluster)


def _kill_when_training(cluster, target, out):
    """Start a slow job, wait for its first steps, then ``target(run)``; returns (run, seconds to end)."""
    run = Run(TINY, *SLOW, "--output-dir", out, "--hostfile", cluster.hostfile(1), "-np", "2",
              env=cluster.env(ENV))
    run.wait_for(lambda: "step 2/" in run.text(), timeout=180)
    hit = time.monotonic()
    target(run)
    run.wait(timeout=BOUND_S * 4)
    return run, run.ended - hit


@pytest.mark.timeout(300)
def test_kill_9_of_lmsrun_ends_the_ranks_on_every_host(cluster):
    run, took = _kill_when_training(cluster, lambda r: r.proc.send_signal(signal.SIGKILL), shared_dir(cluster, "k-l"))
    start = time.monotonic()
    assert_hosts_idle(cluster, within=BOUND_S)
    print(f"\nkill -9 lmsrun: every rank on h1 and h2 gone {time.monotonic() - start + took:.1f} s after the kill")


@pytest.mark.timeout(300)
def test_kill_9_of_mpirun_ends_the_job_and_the_ranks_on_every_host(cluster):
    def kill_mpirun(run):
        import psutil

        mpirun = next(p for p in psutil.Process(run.proc.pid).children(recursive=True) if p.name() == "mpirun")
        mpirun.kill()

    run, took = _kill_when_training(cluster, kill_mpirun, shared_dir(cluster, "k-m"))
    print(f"\nkill -9 mpirun: lmsrun returned {run.proc.returncode} {took:.1f} s after the kill")
    assert run.proc.returncode != 0 and "was killed by signal 9" in run.text("err")
    assert took < BOUND_S
    assert_hosts_idle(cluster, within=BOUND_S)


@pytest.mark.timeout(300)
def test_a_host_cut_from_the_network_ends_the_job_naming_a_rank_and_host(cluster):
    """h2's cable is pulled (ip link set down) while the job trains with the torch backend."""
    out = shared_dir(cluster, "cut")
    run = Run(TINY, *SLOW, "--set", "comm.backend=torch", "--set", "comm.timeout_s=5", "--output-dir", out,
              "--hostfile", cluster.hostfile(1), "-np", "2", env=cluster.env(ENV))
    try:
        run.wait_for(lambda: "step 2/" in run.text(), timeout=180)
        hit = time.monotonic()
        cluster.link(cluster.hosts[1], up=False)
        run.wait(timeout=BOUND_S * 2)
        took = run.ended - hit
    finally:
        cluster.link(cluster.hosts[1], up=True)
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=30)
    print(f"\nh2 cut off: lmsrun returned {run.proc.returncode} {took:.1f} s after the cut (comm.timeout_s 5)")
    print("\n".join(run.text("err").splitlines()[-12:]))
    assert run.proc.returncode != 0
    report = [l for l in run.text("err").splitlines() if l.startswith("lmsrun: rank")]
    assert report and " on host " in report[0], run.text("err")[-3000:]
    assert f"no word from host {cluster.hosts[1].address} (rank 1)" in run.text("err")
    assert took < BOUND_S * 2
    assert_hosts_idle(cluster, within=BOUND_S)
