"""``train.tensorboard``: rank 0's per-step scalars as TensorBoard event files in ``<output_dir>/tb``.

The ``tensorboard`` package is imported only when asked for, so runs without it still work; when it
is asked for and missing, the run stops before training with a one-line error."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from lmsdp.launcher.config.errors import ConfigError

# metric key in the step record -> TensorBoard tag (grouped: train/, swap/, comm/)
SCALARS = {
    "loss": "train/loss", "samples_per_s": "train/samples_per_s", "step_time_s": "train/step_time_s",
    "lr": "train/lr",
    "swap_out_bytes": "swap/out_bytes", "swap_in_bytes": "swap/in_bytes", "stall_ms": "swap/stall_ms",
    "hidden_frac": "swap/hidden_frac", "peak_saved_bytes": "swap/peak_saved_bytes",
    "max_memory_allocated": "memory/max_allocated_bytes", "rss_bytes": "memory/rss_bytes",
    "device_reserved_bytes": "memory/device_reserved_bytes", "device_allocated_bytes": "memory/device_allocated_bytes",
    "allreduce_ms": "comm/allreduce_ms", "allreduce_hidden_frac": "comm/allreduce_hidden_frac",
    "comm_wait_ms": "comm/wait_ms",
}


class TensorBoardScalars:
    """Writes the :data:`SCALARS` of each step record (those present) at ``global_step = step``."""

    def __init__(self, output_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = os.path.join(output_dir, "tb")
        self._writer: Any = SummaryWriter(log_dir=self.log_dir)

    def write(self, record: Dict[str, Any]) -> None:
        step = int(record["step"])
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()


def open_scalars(enabled: bool, is_main: bool, output_dir: str) -> Optional[TensorBoardScalars]:
    """The writer on rank 0 when ``train.tensorboard`` is set, else None. Every rank checks that the
    package imports, so a missing one stops all ranks alike instead of leaving them waiting on rank 0."""
    if not enabled:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("train.tensorboard: the 'tensorboard' package is not installed; "
                          "pip install tensorboard (scripts/setup.sh does), or set train.tensorboard: false") from None
    return TensorBoardScalars(output_dir) if is_main else None
