"""The seams the design rests on, checked on the sources: the topology module is the only reader of
launcher rank variables, every LMSDP_* variable is registered (and so documented), swapping/ and
comm/ never import the launcher, and the config choices come from the registries."""
import os
import re

import pytest

from lmsdp.comm.config import CommConfig
from lmsdp.comm.registry import BACKENDS
from lmsdp.runtime.env import VARIABLES
from lmsdp.swapping.config import SwapConfig
from lmsdp.swapping.registry import TRANSPORTS
from tests.support import REPO

PACKAGES = ("launcher", "comm", "swapping", "runtime")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
                  "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_LOCALID", "LOCAL_RANK", "WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT")


def sources(*folders: str, suffixes=(".py",)):
    for folder in folders:
        for root, _dirs, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(suffixes):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


def test_only_topology_reads_rank_variables():
    pattern = re.compile(r"environ(?:\.get)?\s*[\[(]\s*[\"'](" + "|".join(RANK_VARIABLES) + r")[\"']")
    readers = sorted({path for path, text in sources(*PACKAGES) if pattern.search(text)})
    assert readers == [], f"rank variables read outside runtime/topology/: {readers}"
    topology = "".join(text for _path, text in sources(os.path.join("runtime", "topology")))
    assert "OMPI_COMM_WORLD_RANK" in topology and "SLURM_PROCID" in topology


def test_every_lmsdp_variable_is_registered():
    used = set()
    for _path, text in sources(*PACKAGES, "scripts", "slurm", suffixes=(".py", ".sh", ".sbatch")):
        used |= set(re.findall(r"\bLMSDP_[A-Z0-9_]*[A-Z0-9]\b", text))
    missing = sorted(used - set(VARIABLES))
    assert not missing, f"add these to lmsdp.runtime.env with a one-line doc: {missing}"


@pytest.mark.parametrize("package", ["swapping", "comm", "runtime"])
def test_no_import_of_the_launcher(package):
    bad = [path for path, text in sources(package) if re.search(r"^\s*(from|import)\s+lmsdp\.launcher", text, re.M)]
    assert bad == []


def test_runtime_does_not_import_torch():
    bad = [path for path, text in sources("runtime") if re.search(r"^import torch|^from torch", text, re.M)]
    assert bad == []


def test_config_choices_come_from_the_registries():
    def choices(cls, name):
        return next(f for f in cls.__dataclass_fields__.values() if f.name == name).metadata["choices"]

    assert choices(CommConfig, "backend") == BACKENDS.choices() == ("auto", "horovod", "torch")
    assert choices(SwapConfig, "transport") == TRANSPORTS.choices() == ("auto", "cuda", "loopback")


def test_registry_rejects_unknown_names_with_a_guess():
    with pytest.raises(ValueError, match="did you mean 'horovod'"):
        BACKENDS.get("horovd")


# --------------------------------------------------------------------------------- layout (issue 19)
# launcher/'s sub-packages, lowest first: a module may import its own sub-package and lower layers only;
# launch and train (one layer) never import each other; tools are reached only by name (subcommands).
LAUNCHER_LAYERS = {"models": 0, "config": 1, "launch": 2, "train": 2, "tools": 3, "cli": 4}
MAX_LINES = 400


def _launcher_part(module: str) -> str:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["lmsdp", "launcher"] else ""


def test_launcher_layers_import_downwards_only():
    from tests.architecture_graph import import_graph

    bad = []
    for module, targets in import_graph().items():
        here = _launcher_part(module)
        if here not in LAUNCHER_LAYERS:
            continue
        for target in targets:
            there = _launcher_part(target)
            if there not in LAUNCHER_LAYERS or there == here:
                continue
            if LAUNCHER_LAYERS[there] >= LAUNCHER_LAYERS[here] or (here == "cli" and there == "tools"):
                bad.append(f"{module} -> {target}")
    assert bad == [], "imports against the layering models <- config <- {launch, train} <- tools <- cli: " + str(bad)


def test_every_launcher_module_is_in_a_layer():
    from tests.architecture_graph import package_modules

    loose = [m for m in package_modules() if m.startswith("lmsdp.launcher.") and _launcher_part(m) not in LAUNCHER_LAYERS]
    assert loose == []


def test_no_import_cycles():
    """Over the whole package. A protocol breaks a cycle; a deferred or TYPE_CHECKING import does not."""
    from tests.architecture_graph import cycles, import_graph

    assert cycles(import_graph()) == []


def test_no_module_over_the_line_limit():
    from tests.architecture_graph import package_modules

    long = {m: n for m, path in package_modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (split along their seams): {long}"


def test_no_two_classes_share_a_name():
    import ast
    import collections

    from tests.architecture_graph import package_modules

    where = collections.defaultdict(list)
    for module, path in package_modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(module)
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}
