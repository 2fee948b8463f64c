"""Config loading: round-trip, overrides, and bad input -> one line on stderr naming the key, exit 2."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from lmsdp.launcher.cli import main
from lmsdp.launcher.config import (Config, ConfigError, build, config_to_dict, dump_config, load_config,
                                   config_reference_rows)

from tests.support import REPO
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_quickstart_loads_with_units_and_sections():
    config = load_config(QUICKSTART)
    assert config.name == "quickstart"
    assert config.swap.enabled and config.swap.threshold == 256 * 1024
    assert config.launch.np == 2
    assert config.output_dir == "runs/quickstart"
    assert config.checkpoint_dir == os.path.join("runs/quickstart", "checkpoints")


def test_round_trip_through_yaml(tmp_path):
    config = load_config(QUICKSTART, ["swap.budget=1.5GiB", "optimizer.kwargs={nesterov: true}",
                                      "swap.recompute=[relu, batchnorm]"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config
    assert config_to_dict(again) == config_to_dict(config)
    assert again.swap.budget == int(1.5 * 1024 ** 3)


def test_overrides_create_sections_and_parse_yaml_values(tmp_path):
    config = load_config(None, ["model.name=gpt", "model.kwargs.layers=2", "train.steps=7",
                                "comm.backend=torch", "swap.host_limit=2G", "launch.hosts=a:2,b:2"])
    assert config.model.name == "gpt" and config.model.kwargs == {"layers": 2}
    assert config.train.steps == 7 and config.comm.backend == "torch"
    assert config.swap.host_limit == 2 * 1024 ** 3
    assert config.launch.hosts == "a:2,b:2"


def test_override_wins_over_file(tmp_path):
    path = write(tmp_path, "train: {steps: 3, batch_size: 4}\n")
    assert load_config(path, ["train.steps=9"]).train.steps == 9


def test_no_file_gives_defaults_but_an_empty_file_is_an_error(tmp_path):
    assert load_config(None) == build(Config, {}, "")
    with pytest.raises(ConfigError, match="the config is empty"):  # it would train every default for minutes
        load_config(write(tmp_path, "# nothing yet\n"))


def test_reference_covers_every_key():
    keys = {row[0] for row in config_reference_rows()}
    assert {"swap.threshold", "comm.fusion_threshold", "train.checkpoint_every", "launch.np",
            "model.factory", "slurm.requeue"} <= keys
    assert all(row[3] for row in config_reference_rows()), "every key needs a help text"


# (yaml text or None, overrides, words the one-line error must contain)
BAD_CONFIGS = [
    ("swap: {treshold: 1MiB}\n", [], ["swap.treshold", "did you mean 'threshold'"]),
    ("trian: {steps: 3}\n", [], ["trian", "did you mean 'train'"]),
    ("train: {steps: three}\n", [], ["train.steps", "integer", "three"]),
    ("train: {steps: -1}\n", [], ["train.steps", ">= 0"]),
    ("train: {batch_size: 0}\n", [], ["train.batch_size", ">= 1"]),
    ("train: {batch_size: 2.5}\n", [], ["train.batch_size", "integer"]),
    ("train: {amp: yes please}\n", [], ["train.amp", "true or false"]),
    ("train: {steps: 0, epochs: 0}\n", [], ["train.steps", "train.epochs"]),
    ("swap: {threshold: 1XB}\n", [], ["swap.threshold", "1MiB", "1XB"]),
    ("swap: {threshold: -5}\n", [], ["swap.threshold", "non-negative"]),
    ("swap: {budget: lots}\n", [], ["swap.budget", "lots"]),
    ("swap: {recompute: [relu, sparkle]}\n", [], ["swap.recompute[1]", "sparkle", "allowed"]),
    ("swap: {recompute: [auto]}\n", [], ["swap.recompute", "auto"]),
    ("swap: {transport: nvlink}\n", [], ["swap.transport", "nvlink", "cuda"]),
    ("swap: {prefetch: -1}\n", [], ["swap.prefetch"]),
    ("train: {trace_steps: [14, 10]}\n", [], ["train.trace_steps", "[14, 10]", "first <= last"]),
    ("train: {trace_steps: [0, 4]}\n", [], ["train.trace_steps", "1 <= first"]),
    ("train: {trace_steps: [10]}\n", [], ["train.trace_steps", "[first, last]"]),
    ("train: {trace_steps: later}\n", [], ["train.trace_steps", "list"]),
    ("train: {trace_every: 3}\n", [], ["train.trace_every", "5 steps", "5 or more"]),
    ("train: {trace_every: -1}\n", [], ["train.trace_every", ">= 0"]),
    ("train: {trace_evry: 100}\n", [], ["train.trace_evry", "did you mean 'trace_every'"]),
    ("comm: {backend: nccl}\n", [], ["comm.backend", "nccl", "horovod"]),
    ("comm: {compression: fp8}\n", [], ["comm.compression", "fp16"]),
    ("comm: {op: averag}\n", [], ["comm.op", "did you mean 'average'"]),
    ("optimizer: {name: lamb}\n", [], ["optimizer.name", "lamb", "adamw"]),
    ("optimizer: {lr: fast}\n", [], ["optimizer.lr", "number"]),
    ("model: {name: resnet9000}\n", [], ["model.name", "resnet9000", "resnet18"]),
    ("model: {factory: no_such_pkg.models:build}\n", [], ["model.factory", "no_such_pkg"]),
    ("model: {factory: not-a-spec}\n", [], ["model.factory", "package.module:function"]),
    ("model: {factory: 'os.path:nonexistent_fn'}\n", [], ["model.factory", "nonexistent_fn"]),
    ("model: {kwargs: [1, 2]}\n", [], ["model.kwargs", "mapping"]),
    ("data: {kind: factory}\n", [], ["data.factory", "required"]),
    ("data: {shape: [3, 0, 32]}\n", [], ["data.shape", "positive"]),
    ("data: {shape: 32}\n", [], ["data.shape", "list"]),
    ("launch: {np: two}\n", [], ["launch.np", "integer"]),
    ("launch: {hosts: 'a:1', hostfile: /etc/hostname}\n", [], ["launch.hosts", "launch.hostfile"]),
    ("launch: {hostfile: /no/such/hostfile}\n", [], ["launch.hostfile", "not found"]),
    ("slurm: {launcher: pbs}\n", [], ["slurm.launcher", "srun"]),
    ("- just\n- a list\n", [], ["top level must be a mapping"]),
    ("train:\n  steps: 3\n bad_indent: 1\n", [], ["YAML syntax error", ":3:"]),
    ("train: 5\n", [], ["train", "mapping"]),
    ("", ["swap.threshold"], ["--set", "KEY=VALUE"]),
    ("", ["swap.nope=1"], ["swap.nope", "unknown key"]),
    ("", ["train.steps.x=1"], ["train.steps", "not a section"]),
    (None, [], ["config file not found"]),
    # non-finite numbers (YAML .inf / .nan) for sizes, timeouts, rates and counts
    ("comm: {timeout_s: .inf}\n", [], ["comm.timeout_s", "finite"]),
    ("comm: {timeout_s: .nan}\n", [], ["comm.timeout_s", "finite"]),
    ("swap: {threshold: .inf}\n", [], ["swap.threshold", "finite", "size"]),
    ("swap: {budget: .nan}\n", [], ["swap.budget", "finite"]),
    ("optimizer: {lr: .nan}\n", [], ["optimizer.lr", "finite"]),
    ("optimizer: {weight_decay: -.inf}\n", [], ["optimizer.weight_decay", "finite"]),
    ("train: {steps: .inf}\n", [], ["train.steps", "integer"]),
    ("data: {shape: [3, .nan, 8]}\n", [], ["data.shape[1]", "integer"]),
    ("", ["comm.timeout_s=.nan"], ["comm.timeout_s", "finite"]),
    # a key given twice would silently replace the first
    ("train: {steps: 3}\nmodel: {name: resnet18}\ntrain: {batch_size: 4}\n", [], ["duplicate key 'train'", ":3:", "line 1"]),
    ("train:\n  steps: 3\n  steps: 4\n", [], ["duplicate key 'steps'", ":3:"]),
    # keyword arguments checked against what they are passed to
    ("model: {name: resnet18, kwargs: {dept: 50}}\n", [], ["model.kwargs.dept", "did you mean 'depth'"]),
    ("model: {name: gpt, kwargs: {layer: 2}}\n", [], ["model.kwargs.layer", "did you mean 'layers'"]),
    ("optimizer: {name: adam, kwargs: {betaz: [0.9, 0.99]}}\n", [], ["optimizer.kwargs.betaz", "'betas'"]),
    ("optimizer: {name: sgd, kwargs: {lr: 0.1}}\n", [], ["optimizer.kwargs.lr", "optimizer.lr"]),
    ("model: {factory: 'tests.scripts.bad_factories:plain', kwargs: {widht: 3}}\n", [],
     ["model.kwargs.widht", "did you mean 'width'"]),
    # the job name becomes a path
    ("name: ../../x\n", [], ["name", "'../../x'", "not allowed"]),
    ("name: a/b\n", [], ["name", "slashes"]),
    ("name: ''\n", [], ["name", "not allowed"]),
    ("name: .hidden\n", [], ["name", "not allowed"]),
    # an empty file
    ("\n# only a comment\n", [], ["config is empty", "model:"]),
]


@pytest.mark.parametrize("text,overrides,words", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, overrides, words):
    path = write(tmp_path, text) if text is not None else str(tmp_path / "missing.yaml")
    argv = [path] + [arg for item in overrides for arg in ("--set", item)]
    code = _run_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("lmsrun: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_bad_config_count():
    assert len(BAD_CONFIGS) >= 25


def test_error_names_yaml_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  batch: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: YAML syntax error"):
        load_config(path)


@pytest.mark.integration
def test_real_cli_process_prints_one_line(tmp_path):
    """The installed console script: no traceback, exit 2, key path named."""
    path = write(tmp_path, "swap: {threshold: 12 parsecs}\n")
    lmsrun = os.path.join(os.path.dirname(sys.executable), "lmsrun")
    proc = subprocess.run([lmsrun, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "swap.threshold" in proc.stderr
    assert "Traceback" not in proc.stderr


def _run_main(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse-style exits
        return exc.code


@pytest.mark.integration
def test_readme_config_reference_is_current():
    script = os.path.join(REPO, "scripts", "config_reference.py")
    proc = subprocess.run([sys.executable, script, "--check", os.path.join(REPO, "README.md")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_shipped_configs_load(name, tmp_path):
    path = os.path.join(REPO, "configs", name)
    factory = (yaml.safe_load(open(path, encoding="utf-8")).get("model") or {}).get("factory") or ""
    library = factory.partition(":")[0].split(".")[0]
    if library and importlib.util.find_spec(library) is None:  # configs/hf_gpt2.yaml without transformers
        pytest.skip(f"{name}: {library} is not importable here (pip install {library})")
    overrides = []
    if name == "gpt_text.yaml":  # its token file is made by the command its header gives
        tokens = tmp_path / "pystdlib.bin"
        assert main(["data", "tokens", os.path.dirname(os.__file__), "--max-bytes", "100000", "--out", str(tokens)]) == 0
        overrides = [f"data.path={tokens}"]
    config = load_config(path, overrides)
    assert config.name == name.rsplit(".", 1)[0]
