"""lmsdp.swapping: the large-model-support swap engine (saved activations to host memory and back)."""
from .config import RECOMPUTE_KINDS, SwapConfig
from .units import format_size, parse_size

__all__ = ["SwapConfig", "RECOMPUTE_KINDS", "parse_size", "format_size"]
