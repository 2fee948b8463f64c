"""`lmsrun slurm` script text for several flag combinations, its errors, and the raw templates
(which users copy by hand). No cluster needed; tests/test_slurm_cluster.py runs the scripts."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import List

import pytest

from lmsdp.launcher.cli import main
from lmsdp.launcher.tools import slurm

from tests.support import REPO_PATH as REPO
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
from tests.support import LMSRUN


def script(capsys: pytest.CaptureFixture, tmp_path: Path, *argv: str) -> str:
    """Run ``slurm.main`` and return the printed script (output_dir under tmp_path)."""
    code = slurm.main([QUICKSTART, *argv, "--set", f"train.output_dir={tmp_path}/out"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def sbatch_options(text: str) -> List[str]:
    """The #SBATCH options sbatch would read: those before the first command line."""
    options = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            options.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            break
    return options


@pytest.mark.integration
def test_one_node_gpus_with_partition_account_requeue(capsys, tmp_path):
    text = script(capsys, tmp_path, "--nodes", "1", "--gpus-per-node", "4", "--time", "02:00:00",
                  "--partition", "gpu", "--account", "proj42", "--requeue")
    opts = sbatch_options(text)
    assert opts == ["--job-name=quickstart", f"--output={tmp_path}/out/slurm-%j.out", "--open-mode=append",
                    f"--chdir={os.getcwd()}", "--nodes=1", "--ntasks-per-node=4", "--gres=gpu:4",
                    "--time=02:00:00", "--partition=gpu", "--account=proj42", "--signal=B:USR1@90", "--requeue"]
    assert "template (a)" in text
    assert "REQUEUE=1" in text and "export LMSDP_EXPECTED_NP=4" in text
    assert f"LMSRUN={LMSRUN}" in text and f"CONFIG={QUICKSTART}" in text
    launch = [line for line in text.splitlines() if line.startswith("srun ")]
    assert launch == [f'srun --mpi=pmix --kill-on-bad-exit=1 "$LMSRUN" "$CONFIG" --set train.output_dir={tmp_path}/out '
                      "--set train.resume=true &"]
    # a failed task writes its error here, which rules out a requeue (a failure is not a preemption)
    assert f"export LMSDP_ERROR_DIR={tmp_path}/out/errors" in text
    assert '[ "$REQUEUE" = 1 ] && [ -z "$failed" ]' in text
    assert "scontrol requeue" in text and "trap 'forward USR1' USR1" in text and "trap 'forward TERM' TERM" in text


@pytest.mark.integration
def test_several_cpu_nodes_take_launch_np_tasks_and_leave_optional_lines_out(capsys, tmp_path):
    text = script(capsys, tmp_path, "--nodes", "3", "--gpus-per-node", "0", "--no-requeue",
                  "--set", "launch.np=2", "--set", "launch.threads=4")
    opts = sbatch_options(text)
    assert "template (b)" in text
    assert "--nodes=3" in opts and "--ntasks-per-node=2" in opts and "--cpus-per-task=4" in opts
    assert "--no-requeue" in opts and "--time=01:00:00" in opts
    assert not [o for o in opts if o.startswith(("--gres", "--partition", "--account"))]
    assert "REQUEUE=0" in text and "export LMSDP_EXPECTED_NP=6" in text
    assert "--set launch.np=2 --set launch.threads=4" in text
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text  # srun >= 22.05 does not inherit it


@pytest.mark.integration
def test_mpirun_launcher_and_config_defaults(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(Path(QUICKSTART).read_text() + "\nslurm: {nodes: 2, gpus_per_node: 8, launcher: mpirun, "
                   "requeue: true, signal_seconds: 300, time: '1-00:00:00', partition: big}\n")
    code = slurm.main([str(cfg), "--set", f"train.output_dir={tmp_path}/o"])
    text = capsys.readouterr().out
    assert code == 0
    opts = sbatch_options(text)
    assert "template (c)" in text
    assert {"--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8", "--signal=B:USR1@300", "--requeue",
            "--time=1-00:00:00", "--partition=big"} <= set(opts)
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    assert any(line.startswith('mpirun -np "$SLURM_NTASKS"') for line in commands)
    assert not [line for line in commands if line.startswith("srun")]
    assert "export LMSDP_EXPECTED_NP=16" in text and "-x LMSDP_EXPECTED_NP" in text
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in text
    # flags beat the config's slurm section
    code = slurm.main([str(cfg), "--nodes", "1", "--launcher", "srun", "--no-requeue", "--signal-seconds", "0",
                       "--set", f"train.output_dir={tmp_path}/o"])
    text = capsys.readouterr().out
    opts = sbatch_options(text)
    assert code == 0 and "template (a)" in text and "--nodes=1" in opts and "--no-requeue" in opts
    assert not [o for o in opts if o.startswith("--signal")]


@pytest.mark.integration
def test_overrides_are_shell_quoted_and_resume_always_comes_last(capsys, tmp_path):
    text = script(capsys, tmp_path, "--nodes", "1", "--gpus-per-node", "2",
                  "--set", "train.steps=7", "--set", "name=my run")
    opts = sbatch_options(text)
    assert "--job-name=my_run" in opts
    assert f"--output={tmp_path}/out/slurm-%j.out" in opts
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--set train.steps=7 --set 'name=my run'" in line
    assert line.endswith("--set train.resume=true &")


@pytest.mark.integration
@pytest.mark.parametrize("flags", [
    ["--nodes", "1", "--gpus-per-node", "2"],
    ["--nodes", "4", "--gpus-per-node", "8", "--partition", "p", "--account", "a", "--requeue"],
    ["--nodes", "2", "--gpus-per-node", "0", "--launcher", "mpirun", "--requeue"],
])
def test_every_rendered_script_is_complete_valid_bash(capsys, tmp_path, flags):
    text = script(capsys, tmp_path, *flags)
    assert "{{" not in text and "}}" not in text and "#@" not in text
    assert text.startswith("#!/bin/bash\n")
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # every #SBATCH line sits before the first command (sbatch ignores the ones after it)
    assert sbatch_options(text) == [l.split(None, 1)[1] for l in text.splitlines() if l.startswith("#SBATCH")]


@pytest.mark.integration
def test_output_file_is_written_executable_and_output_dir_created(capsys, tmp_path):
    target = tmp_path / "jobs" / "train.sbatch"
    code = slurm.main([QUICKSTART, "--nodes", "1", "--gpus-per-node", "1", "--output", str(target),
                       "--set", f"train.output_dir={tmp_path}/logs/q"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == ""
    assert str(target) in captured.err
    assert os.access(target, os.X_OK)
    assert "--gres=gpu:1" in sbatch_options(target.read_text())
    assert (tmp_path / "logs" / "q").is_dir()  # Slurm would not create the log folder itself


@pytest.mark.parametrize("argv, message", [
    (["--time", "1h"], "--time '1h' is not a Slurm time"),
    (["--time", "00:01:00"], "does not fit in --time 00:01:00"),
    (["--nodes", "0"], "--nodes must be 1 or more"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be 0"),
    (["--signal-seconds", "70000"], "--signal-seconds must be between 0 and 65535"),
    (["--set", "slurm.launcher=aprun"], "slurm.launcher: 'aprun' is not allowed"),
])
def test_bad_flags_are_one_line_errors(capsys, tmp_path, argv, message):
    code = main(["slurm", QUICKSTART, *argv, "--set", f"train.output_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lmsrun: error: ") and message in err, err


def test_missing_config_is_a_one_line_error(capsys, tmp_path):
    assert main(["slurm", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found" in err


def test_time_seconds_follows_slurm_formats():
    assert [slurm.time_seconds(t) for t in ("90", "5:30", "01:00:00", "2-0", "1-02:03", "1-00:00:01")] == \
        [5400, 330, 3600, 172800, 93780, 86401]


@pytest.mark.integration
def test_templates_ship_with_the_package_and_carry_hand_copy_comments():
    names = sorted(slurm.TEMPLATES.values())
    assert names == sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))
    for name in names:
        raw = slurm.load_template(name)
        assert "#@ To copy this template by hand, replace every {{...}}" in raw
        assert "scontrol requeue" in raw and "--signal=B:USR1@{{signal_seconds}}" in raw
        assert set(re.findall(r"\{\{(\w+)\}\}", raw)) <= set(slurm.SlurmJob(
            "c", "n", "/w", "/o", 1, 1, 1, None, "1", None, None, "srun", 90, False, "lmsrun", []).values())
    setup = (REPO / "setup.cfg").read_text()
    assert "lmsdp.launcher.templates = slurm" in setup and "lmsdp.launcher.templates = *.sbatch" in setup


@pytest.mark.integration
def test_lmsrun_dispatches_slurm_subcommand(tmp_path):
    proc = subprocess.run([LMSRUN, "slurm", QUICKSTART, "--nodes", "2", "--gpus-per-node", "4",
                           "--set", f"train.output_dir={tmp_path}/out"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=2" in sbatch_options(proc.stdout) and "export LMSDP_EXPECTED_NP=8" in proc.stdout
