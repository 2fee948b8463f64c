"""lmsdp.swapping: the large-model-support swap engine (saved activations to host memory and back)."""
from .config import RECOMPUTE_KINDS, SwapConfig
from .engine import SwapEngine
from .pool import HostMemoryLimitError, HostPool, size_class
from .recompute import Recompute, apply_recompute
from .script import config_from_env, enable, enable_from_env
from .units import format_size, parse_size

__all__ = ["SwapConfig", "SwapEngine", "HostMemoryLimitError", "HostPool", "size_class", "Recompute",
           "apply_recompute", "enable", "enable_from_env", "config_from_env", "RECOMPUTE_KINDS",
           "parse_size", "format_size"]
