"""lmsdp.swapping: the large-model-support swap engine (saved activations to host memory and back).

Names are imported on first use (PEP 562), so torch-free parts such as ``lmsdp.swapping.registry``
and ``lmsdp.swapping.units`` can be read by the launcher's front end without importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SwapConfig": "config", "RECOMPUTE_KINDS": "config", "SwapEngine": "engine",
    "HostMemoryLimitError": "pool", "HostPool": "pool", "size_class": "pool",
    "Recompute": "recompute", "apply_recompute": "recompute",
    "enable": "script", "enable_from_env": "script", "config_from_env": "script",
    "parse_size": "units", "format_size": "units", "TRANSPORTS": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmsdp.swapping' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + list(_EXPORTS))
