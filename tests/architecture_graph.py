"""The package's import graph read from the sources (every import counts: top level, inside a function,
or under ``TYPE_CHECKING``), for tests/test_architecture.py's layering and cycle rules."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

from tests.support import REPO

FOLDERS = {"launcher": "lmsdp.launcher", "swapping": "lmsdp.swapping", "comm": "lmsdp.comm", "runtime": "lmsdp.runtime"}


def package_modules() -> Dict[str, str]:
    """Dotted module name -> source path, for every module of the installed package."""
    found = {}
    for folder, dotted in FOLDERS.items():
        for root, _dirs, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([dotted] + rel)] = os.path.join(root, name)
    return found


def imports_of(module: str, path: str, known: Dict[str, str]) -> Set[str]:
    """The package modules ``module`` imports (``from a import b`` counts as ``a.b`` when b is a module)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = anchor + ("." + node.module if node.module else "")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    found.add(full)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def import_graph() -> Dict[str, Set[str]]:
    known = package_modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found
