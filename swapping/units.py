"""Byte sizes with units ("1MiB", "512K", "2.5GB", 4096) shared by every config section."""
from __future__ import annotations

import re
from typing import Optional, Union

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")
SIZE_HELP = "a byte count or a size like 512KiB, 1MiB, 2.5GB (units B, K/KiB, M/MiB, G/GiB, T/TiB, KB/MB/GB/TB)"


def parse_size(value: Union[int, float, str, None]) -> Optional[int]:
    """Return ``value`` in bytes; ``None`` stays ``None``. Raises ValueError naming what is allowed."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: Union[int, float]) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
