"""The one place a user-facing error becomes output: ``lmsrun: error: <what>`` on one line of stderr
and the error's exit code (2), for the front door and every subcommand alike. Code below raises
``UserError`` (or a subclass) and never prints its own."""
from __future__ import annotations

import sys
from typing import Callable

from lmsdp.launcher.config.errors import UserError

PREFIX = "lmsrun: error: "


def report(exc: UserError) -> int:
    """Print ``exc`` as the one error line; return its exit code."""
    print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
    return exc.exit_code


def guarded(action: Callable[[], int]) -> int:
    """Run ``action``; a UserError anywhere inside it is one line and its exit code, no traceback."""
    try:
        return int(action())
    except UserError as exc:
        return report(exc)
