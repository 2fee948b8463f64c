"""Errors the user can fix: printed as one line (``lmsrun: error: ...``), exit code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (config, flags, environment). ``hint`` is appended as '(hint: ...)'."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class TopologyError(UserError):
    """The ranks' environment is inconsistent (e.g. more local ranks than GPUs)."""
