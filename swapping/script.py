"""Script mode: ``enable()`` installs the swap hooks for the whole process and reports at exit."""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from typing import Any, Dict, Optional

import torch

from lmsdp.runtime import env as envvars
from lmsdp.runtime.errors import UserError
from lmsdp.runtime.topology import detect_launched

from .config import SwapConfig
from .engine import SwapEngine
from .units import parse_size

_engine: Optional[SwapEngine] = None
ENV = {
    "LMSDP_SWAP_THRESHOLD": "threshold", "LMSDP_SWAP_PREFETCH": "prefetch",
    "LMSDP_SWAP_KEEP_LAST": "keep_last", "LMSDP_SWAP_BUDGET": "budget",
    "LMSDP_SWAP_HOST_LIMIT": "host_limit", "LMSDP_SWAP_RECOMPUTE": "recompute",
    "LMSDP_SWAP_TRANSPORT": "transport", "LMSDP_SWAP_TRACE": "trace", "LMSDP_SWAP_LINK_GBPS": "link_gbps",
    "LMSDP_SWAP_DISK_DIR": "disk_dir", "LMSDP_SWAP_DISK_LIMIT": "disk_limit",
}


def _default_device() -> torch.device:
    """``cuda:local_rank % GPUs`` (local rank from the launcher, via the topology), else CPU."""
    if torch.cuda.is_available():
        try:
            topology = detect_launched()
        except UserError:
            topology = None  # a broken launcher environment is the script's to report, not ours
        local = topology.local_rank if topology is not None else 0
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def enable(config: Optional[SwapConfig] = None, device: Any = None, **overrides: Any) -> SwapEngine:
    """Switch swapping on for the whole process: no ``with`` needed, steps detected automatically
    (a pack after a finished backward starts a new step), a one-line summary printed at exit."""
    global _engine
    if _engine is not None:
        return _engine
    config = dataclasses.replace(config or SwapConfig(), **overrides)
    config.enabled = True if "enabled" not in overrides else config.enabled
    engine = SwapEngine(config, device if device is not None else _default_device())
    engine.install_global()
    _engine = engine
    atexit.register(_report, engine)
    return engine


def _report(engine: SwapEngine) -> None:
    if not engine.enabled:
        return
    try:
        if engine.step_open:
            engine.step_end()
        print(f"[lmsdp swap] {engine.describe()}", file=sys.stderr, flush=True)
    finally:
        engine.close()


def config_from_env(environ: Optional[Dict[str, str]] = None) -> SwapConfig:
    """SwapConfig from LMSDP_SWAP_* variables (sizes accept units; RECOMPUTE is 'auto' or a comma list)."""
    env = os.environ if environ is None else environ
    values: Dict[str, Any] = {"enabled": envvars.flag(envvars.SWAP, env)}
    for var, name in ENV.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name in ("threshold", "budget", "host_limit", "disk_limit"):
            values[name] = parse_size(raw)
        elif name in ("prefetch", "keep_last"):
            values[name] = int(raw)
        elif name == "link_gbps":
            values[name] = float(raw)
        elif name == "recompute":
            parts = [p.strip() for p in raw.split(",") if p.strip()]
            values[name] = None if parts in ([], ["none"]) else ("auto" if parts == ["auto"] else parts)
        else:
            values[name] = raw
    return SwapConfig(**values)


def enable_from_env() -> Optional[SwapEngine]:
    """Called from the launcher's sitecustomize: enable() when LMSDP_SWAP=1, else nothing."""
    config = config_from_env()
    if not config.enabled:
        return None
    return enable(config)
