"""Configuration of the gradient allreduce backend (same metadata conventions as SwapConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .registry import BACKENDS


@dataclass
class CommConfig:
    """Which backend reduces gradients and how."""

    backend: str = field(default="auto", metadata={
        "choices": BACKENDS.choices(),
        "help": "auto = the first usable of " + ", ".join(BACKENDS.names()) + " (horovod: when horovod.torch "
                "imports and the job was not started by torchrun)"})
    op: str = field(default="average", metadata={
        "choices": ("average", "sum", "adasum"), "help": "gradient reduction op"})
    compression: str = field(default="none", metadata={
        "choices": ("none", "fp16"), "help": "gradient compression on the wire"})
    backward_passes_per_step: int = field(default=1, metadata={
        "help": "local gradient accumulation steps before each allreduce"})
    gradient_predivide_factor: float = field(default=1.0, metadata={
        "help": "divide gradients by this before the sum and by size/factor after (Horovod)"})
    fusion_threshold: int = field(default=64 << 20, metadata={
        "unit": "bytes", "help": "tensor fusion buffer (HOROVOD_FUSION_THRESHOLD; DDP bucket size for torch)"})
    cycle_time_ms: float = field(default=1.0, metadata={
        "help": "Horovod background cycle time (HOROVOD_CYCLE_TIME)"})
    timeline: Optional[str] = field(default=None, metadata={
        "help": "Horovod timeline / allreduce chrome-trace path ({output_dir}, {rank} are replaced)"})
    timeout_s: float = field(default=300.0, metadata={
        "min": 1.0,
        "help": "seconds a collective may wait for a live but stuck peer before the rank fails with an "
                "error (a dead peer fails at once); must exceed the slowest checkpoint write"})
