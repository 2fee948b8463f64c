"""Errors the user can fix: printed as one line (``lmsrun: error: ...``), exit code 2, no traceback."""
from __future__ import annotations

from lmsdp.runtime.errors import TopologyError, UserError

__all__ = ["UserError", "ConfigError", "TopologyError"]


class ConfigError(UserError):
    """A config file or ``--set`` override is invalid; the message names the key path."""
