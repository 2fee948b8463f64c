#!/usr/bin/env python3
"""Print or refresh the README's generated tables, so the documentation cannot drift from the code:

- ``config-reference``: every config key, its type, default and meaning (from the config dataclasses);
- ``registries``: the comm backends, comm strategies and swap transports registered by name;
- ``environment``: every ``LMSDP_*`` variable (from ``lmsdp.runtime.env``).

``--check README.md`` exits 1 if a table is stale; ``--write README.md`` rewrites them in place."""
from __future__ import annotations

import sys
from typing import Callable, Dict

from lmsdp.comm.registry import BACKENDS, STRATEGIES
from lmsdp.launcher.config import config_reference_rows
from lmsdp.runtime.env import VARIABLES
from lmsdp.swapping.registry import TRANSPORTS


def _cell(text: str) -> str:
    return text.replace("|", "&#124;")


def config_table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in config_reference_rows():
        shown = "" if default is None else (f"`{default}`" if default != "" else '`""`')
        lines.append(f"| `{key}` | {_cell(kind)} | {shown} | {_cell(meaning)} |")
    return "\n".join(lines)


def registry_table() -> str:
    lines = ["| config key | name | what it is |", "|---|---|---|"]
    for key, registry in (("comm.backend", BACKENDS), ("comm.strategy", STRATEGIES), ("swap.transport", TRANSPORTS)):
        for entry in registry.entries():
            lines.append(f"| `{key}` | `{entry.name}` | {_cell(entry.doc)} |")
    return "\n".join(lines)


def environment_table() -> str:
    lines = ["| variable | set by | meaning |", "|---|---|---|"]
    for var in VARIABLES.values():
        lines.append(f"| `{var.name}` | {var.who} | {_cell(var.doc)} |")
    return "\n".join(lines)


BLOCKS: Dict[str, Callable[[], str]] = {
    "config-reference": config_table, "registries": registry_table, "environment": environment_table,
}


def _markers(name: str) -> tuple:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def stale(text: str) -> list:
    """Names of the blocks whose text in ``text`` differs from the generated one (or is missing)."""
    out = []
    for name, make in BLOCKS.items():
        begin, end = _markers(name)
        current = text.split(begin, 1)[1].split(end, 1)[0].strip() if begin in text else None
        if current != make():
            out.append(name)
    return out


def main(argv: list) -> int:
    if len(argv) == 2 and argv[0] == "--check":
        bad = stale(open(argv[1], encoding="utf-8").read())
        if bad:
            print(f"{argv[1]}: generated tables are stale ({', '.join(bad)}); regenerate with "
                  f"scripts/config_reference.py --write {argv[1]}")
            return 1
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        text = open(argv[1], encoding="utf-8").read()
        for name, make in BLOCKS.items():
            begin, end = _markers(name)
            if begin not in text:
                print(f"{argv[1]}: no {begin} marker; add the markers where the table goes", file=sys.stderr)
                return 1
            head, rest = text.split(begin, 1)
            text = f"{head}{begin}\n{make()}\n{end}{rest.split(end, 1)[1]}"
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(text)
        return 0
    for name, make in BLOCKS.items():
        print(f"## {name}\n{make()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
