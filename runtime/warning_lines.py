"""lmsdp's own Python warnings as one ``[lmsdp] ...`` line each.

lmsdp's warnings begin with ``lmsdp `` (``"lmsdp swap: the engine runs on cpu ..."``). Python's default
format adds the file and the source line the warning points at (``engine = SwapEngine(...)``, a line the
user never wrote), two lines where one says it. ``install`` formats them as ``[lmsdp] swap: the engine
...`` and, as every rank says the same, keeps them to rank 0. Other warnings keep Python's format, or
its first line only (``one_line_others``: the product's own training loop, where the source line is
lmsdp's).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

OWN_PREFIX = "lmsdp "


def format_lmsdp(message: str) -> str:
    """``lmsdp swap: X`` -> ``[lmsdp] swap: X``, on one line."""
    text = " ".join(message.splitlines())
    return f"[lmsdp] {text[len(OWN_PREFIX):] if text.startswith(OWN_PREFIX) else text}\n"


def install(rank: int, one_line_others: bool = False) -> None:
    """From now on in this process: lmsdp's warnings as one line, shown on rank 0 only."""
    previous = warnings.formatwarning
    if getattr(previous, "lmsdp_lines", False):
        previous = previous.previous  # type: ignore[attr-defined]

    def formatwarning(message: Any, category: type, filename: str, lineno: int,
                      line: Optional[str] = None) -> str:
        text = str(message)
        if text.startswith(OWN_PREFIX):
            return format_lmsdp(text)
        if one_line_others:
            return f"{filename}:{lineno}: {category.__name__}: {' '.join(text.splitlines())}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning.lmsdp_lines = True  # type: ignore[attr-defined]
    formatwarning.previous = previous  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning
    if rank != 0:
        warnings.filterwarnings("ignore", message=OWN_PREFIX)
