#!/usr/bin/env python3
"""Print the README's config reference table (every key, type, default, meaning) from the config
dataclasses, so the documentation cannot drift from the code. `--check README.md` exits 1 if stale."""
from __future__ import annotations

import sys

from lmsdp.launcher.config import reference_rows

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in reference_rows():
        shown = "" if default is None else (f"`{default}`" if default != "" else '`""`')
        lines.append(f"| `{key}` | {kind.replace('|', '&#124;')} | {shown} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines)


def main(argv: list) -> int:
    if len(argv) == 2 and argv[0] == "--check":
        text = open(argv[1], encoding="utf-8").read()
        current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in text else ""
        if current != table():
            print(f"{argv[1]}: config reference is stale; regenerate with scripts/config_reference.py --write {argv[1]}")
            return 1
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        text = open(argv[1], encoding="utf-8").read()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
