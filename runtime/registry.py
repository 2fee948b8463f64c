"""Implementations registered by name (like torch's rendezvous ``handler_registry``): config choices,
the ``auto`` rule and the README tables are derived from a registry, never written out by hand.

Targets are ``"package.module:Attribute"`` strings, imported on first use, so a registry can be read
(for config validation, help texts, docs) without importing torch, Horovod or CUDA."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Entry:
    """One implementation: its name, where it lives, one line of what it is, and when ``auto`` may
    pick it (``usable(*context)``; None: always)."""

    name: str
    target: str
    doc: str
    usable: Optional[Callable[..., bool]] = None

    def load(self) -> Any:
        module, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


class Registry:
    """Named implementations of one kind (``kind`` names it in messages: 'comm backend')."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, target: str, doc: str, usable: Optional[Callable[..., bool]] = None) -> Entry:
        if name in self._entries or name == "auto":
            raise ValueError(f"{self.kind} {name!r} is registered already (or reserved)")
        entry = Entry(name, target, doc, usable)
        self._entries[name] = entry
        return entry

    def names(self) -> Tuple[str, ...]:
        """Registered names in registration order (which is also ``auto``'s order of preference)."""
        return tuple(self._entries)

    def choices(self) -> Tuple[str, ...]:
        """What a config key may say: ``auto`` and every registered name."""
        return ("auto",) + self.names()

    def entries(self) -> List[Entry]:
        return list(self._entries.values())

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name is a ValueError with a did-you-mean."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{guess}; choose {', '.join(self.choices())}")
        return self._entries[name]

    def resolve(self, name: str, *context: Any) -> Entry:
        """``name`` itself, or for ``auto`` the first registered entry usable in ``context``."""
        if name != "auto":
            return self.get(name)
        for entry in self._entries.values():
            if entry.usable is None or entry.usable(*context):
                return entry
        raise ValueError(f"no {self.kind} is usable here; registered: {', '.join(self.names())}")
