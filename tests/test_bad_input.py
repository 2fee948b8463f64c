"""Bad flags and bad things a user's factory does: each is one line on stderr naming the flag or key
and what is allowed, exit code 2, no traceback (the config-file cases are in test_config.py)."""
import json
import os
import shutil
import subprocess

import pytest

from lmsdp.launcher.cli import main
from tests.support import ENV, LMSRUN, REPO, SCRIPTS, TINY

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


@pytest.fixture(autouse=True)
def _tiny_model_importable(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # tiny.yaml's model.factory lives there


def _main(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmsrun: error: ") and "Traceback" not in err, err
    return lines[0]


BAD_FLAGS = [
    (["--stop-timeout", "-5"], ["--stop-timeout", ">= 0"]),
    (["--stop-timeout", "nan"], ["--stop-timeout", "finite"]),
    (["--stop-timeout", "inf"], ["--stop-timeout", "finite"]),
    (["--stop-timeout", "soon"], ["--stop-timeout", "seconds"]),
    (["-np", "0"], ["-np", "positive"]),
    (["-np", "two"], ["-np", "integer"]),
    (["--threads", "-1"], ["--threads", "0 or more"]),
    (["--no-such-flag"], ["unrecognized arguments", "--no-such-flag", "--help"]),
    (["--swap-transport", "pigeon"], ["--swap-transport", "pigeon"]),
    (["--swap-link-gbps", "0"], ["--swap-link-gbps", "positive number", "'0'"]),
    (["--mpi-args"], ["--mpi-args", "expected one argument"]),
    (["-H", "a:b"], ["-H", "host:slots"]),
    (["-H", "node1:0"], ["-H", "host:slots"]),
    (["-H", "no-such-host-lmsdp.invalid:2"], ["-H", "no-such-host-lmsdp.invalid", "does not resolve"]),
    (["-H", "localhost:1", "--hostfile", "/etc/hostname"], ["-H", "--hostfile"]),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2(capsys, flags, words):
    code = _main([TINY, *flags])
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


def test_unresolvable_host_in_a_hostfile_is_one_line(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\nno-such-host-lmsdp.invalid slots=2\n")
    assert _main([TINY, "--hostfile", str(hostfile)]) == 2
    assert "no-such-host-lmsdp.invalid" in _one_line(capsys.readouterr().err)


def _lmsrun(*args, timeout=120):
    return subprocess.run([LMSRUN, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("factory,words", [
    ("bad_factories:raises", ["model.factory", "raised ValueError: cannot build a model of width 4"]),
    ("bad_factories:not_a_module", ["model.factory", "returned dict", "torch.nn.modules.module.Module"]),
])
def test_factory_that_raises_or_returns_a_non_module_is_one_line(tmp_path, factory, words):
    done = _lmsrun(TINY, "-np", "1", "--set", f"model.factory={factory}", "--set", "model.kwargs={}",
                   "--output-dir", str(tmp_path))
    line = _one_line(done.stderr)
    assert done.returncode == 2, done.stderr
    for word in words:
        assert word in line, line


@pytest.mark.integration
@pytest.mark.mpi
@needs_mpirun
@pytest.mark.timeout(120)
def test_mpi_args_mpirun_rejects_are_one_line(tmp_path):
    done = _lmsrun(TINY, "--mpi-args=--no-such-mpirun-option", "--output-dir", str(tmp_path))
    line = _one_line(done.stderr)
    assert done.returncode == 2 and "--mpi-args" in line and "--no-such-mpirun-option" in line, done.stderr


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_summary_json_is_json_even_when_the_loss_is_nan(tmp_path):
    # lr is checked, but a loss can still diverge: a huge rate makes it inf/nan within a few steps
    done = _lmsrun(TINY, "-np", "1", "--set", "optimizer.lr=1.0e+30", "--set", "train.steps=4",
                   "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "summary.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in summary.json"))
