"""``lmsrun``'s subcommand table: ``--help`` lists it, each name reaches its own parser, and a
misspelt name is one line with a did-you-mean (while an existing file of that name is still a config)."""
import subprocess

import pytest

from lmsdp.launcher.cli import main
from lmsdp.launcher.cli.subcommands import SUBCOMMANDS
from tests.support import ENV, LMSRUN, REPO


def _main(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_help_lists_every_subcommand_with_its_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps the description to this width
    assert _main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("subcommands (lmsrun {plan,tune,report,export,data,slurm} ... ; each has its own --help):")
    assert lines[at + 1:at + 7] == [
        "  plan    predict peak memory and step time; choose what to keep, swap or recompute",
        "  tune    short trial runs choose ranks, threads, batch and binding; --write a tuned config",
        "  report  plots and an HTML page of one or more finished runs",
        "  export  one consolidated model.pt from a run's (sharded) checkpoint",
        "  data    make data files: a byte-level token file from text (lmsrun data tokens PATH --out FILE)",
        "  slurm   write (or submit) an sbatch script for a config",
    ]
    assert lines[at + 7:] == []
    # the description above is still wrapped to the terminal, not printed as one long line
    assert "Data-parallel training with large model support: one MPI rank per GPU. With" in lines


@pytest.mark.parametrize("name", SUBCOMMANDS.names())
def test_each_subcommand_reaches_its_own_parser(capsys, name):
    assert _main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: lmsrun {name} ")


@pytest.mark.parametrize("word,guess", [("tnue", "tune"), ("plna", "plan"), ("reprot", "report"),
                                        ("exprot", "export"), ("slrum", "slurm")])
def test_a_misspelt_subcommand_is_one_line_with_a_guess(capsys, word, guess):
    assert _main([word, "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == (f"lmsrun: error: {word}: no such subcommand or file (did you mean 'lmsrun {guess}'?); "
                   "subcommands: plan, tune, report, export, data, slurm\n")


def test_an_existing_file_named_like_a_typo_is_still_a_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tnue").write_text("model: [\n")  # a (broken) config that happens to be called tnue
    assert _main(["tnue"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and err.startswith("lmsrun: error: "), err


def test_a_missing_config_far_from_any_name_is_not_called_a_typo(capsys):
    assert _main(["no-such-config.yaml"]) == 2
    assert capsys.readouterr().err == "lmsrun: error: config file not found: no-such-config.yaml\n"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_typo_through_the_real_lmsrun():
    done = subprocess.run([LMSRUN, "tnue", "x.yaml"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["lmsrun: error: tnue: no such subcommand or file (did you mean "
                                        "'lmsrun tune'?); subcommands: plan, tune, report, export, data, slurm"]


@pytest.mark.parametrize("name", SUBCOMMANDS.names())
def test_every_subcommand_reports_bad_input_through_the_one_boundary(capsys, name):
    """Bad flags and bad values alike: one 'lmsrun: error:' line, exit 2, whatever the subcommand."""
    assert _main([name, "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmsrun: error: ") and "Traceback" not in err, err
    bad_value = ["tokens", "/nonexistent/x", "--out", "x.bin"] if name == "data" else ["/nonexistent/x.yaml"]
    assert _main([name, *bad_value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmsrun: error: ") and "Traceback" not in err, err
