"""The swap transports lmsdp knows, by name: what moves a saved tensor's bytes off the device and back.
``swap.transport`` choices, the ``auto`` rule and the README table come from here. Where the bytes
live on the host side (host pool, disk tier below it) is the storage's business (``storage.py``), not a transport's.

Torch-free on import: targets are imported only when a transport is created."""
from __future__ import annotations

from typing import Any

from lmsdp.runtime.registry import Registry

TRANSPORTS = Registry("swap transport")


def _is_cuda(device: Any) -> bool:
    return getattr(device, "type", str(device)) == "cuda"


TRANSPORTS.register("cuda", "lmsdp.swapping.cuda_transport:CudaTransport",
                    "CUDA: copies on dedicated swap-out / swap-in streams into pinned host memory, events for ordering",
                    usable=_is_cuda)
TRANSPORTS.register("loopback", "lmsdp.swapping.transport:LoopbackTransport",
                    "CPU worker thread and plain buffers: every engine path (prefetch order, accounting) runs in "
                    "CPU tests; on a CPU device it saves no memory")
