"""What every ``lmsrun`` subcommand's flags share: a parser whose errors are UserErrors (printed by
the one error boundary, ``lmsdp.launcher.cli.boundary``, as ``lmsrun: error: <flag>: <what>``, exit 2,
no usage block) and the integer types its flags use."""
from __future__ import annotations

import argparse
from typing import List, NoReturn

from .errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors pointing at the command's --help."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _int_at_least(text: str, least: int, wanted: str) -> int:
    """``text`` as an integer >= ``least``; argparse's type error names what is ``wanted``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        plain = "an integer" if least == 0 and value is None else wanted
        raise argparse.ArgumentTypeError(f"expected {plain}, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or more")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def positive_float(text: str) -> float:
    """``text`` as a number > 0 (argparse type: e.g. --swap-link-gbps)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def rank_list(text: str) -> List[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (argparse type for --ranks)."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive rank counts, e.g. 1,2,4,8; got {text!r}")
    return values
