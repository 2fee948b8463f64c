"""Configuration of the swap engine. Field metadata drives the YAML loader and the README table:
``unit="bytes"`` accepts sizes with units, ``choices`` lists allowed strings, ``help`` explains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from .registry import TRANSPORTS

RECOMPUTE_KINDS = ("relu", "gelu", "silu", "activation", "batchnorm", "layernorm", "groupnorm",
                   "norm", "pool", "dropout")


@dataclass
class SwapConfig:
    """What the LMS swap engine moves to host memory, when it brings it back, and what it recomputes."""

    enabled: bool = field(default=False, metadata={"help": "switch the swap engine on"})
    threshold: int = field(default=1 << 20, metadata={
        "unit": "bytes", "help": "smallest saved tensor that is swapped; smaller ones stay on the device"})
    prefetch: int = field(default=2, metadata={
        "help": "swap-ins started ahead of the tensor backward needs now"})
    keep_last: int = field(default=1, metadata={
        "help": "the last N tensors packed in forward are never swapped (backward needs them first)"})
    budget: int = field(default=0, metadata={
        "unit": "bytes", "help": "saved bytes allowed to stay resident on the device before swapping starts"})
    swap_out_window: int = field(default=256 << 20, metadata={"min": 1,
        "unit": "bytes", "help": "swap-out bytes in flight (a tensor stays on the device until its copy has finished); "
                                 "past it, compute waits for the oldest copies"})
    prefetch_window: int = field(default=256 << 20, metadata={"min": 1,
        "unit": "bytes", "help": "swapped-in bytes on the device ahead of (or still in) their use; prefetching "
                                 "stops at it (prefetch counts tensors, this counts bytes: both bound it)"})
    link_gbps: Optional[float] = field(default=None, metadata={
        "help": "loopback transport only: pace its copies to this many GB/s per direction, a simulation of a "
                "slow link on CPU (transfer-bound behaviour in tests and benchmarks); default: unlimited"})
    host_limit: Optional[int] = field(default=None, metadata={
        "unit": "bytes", "help": "cap on pinned host memory for swapped tensors; exceeding it is a HostMemoryLimitError, "
                                 "or with disk_dir the tensors past it spill to disk"})
    disk_dir: Optional[str] = field(default=None, metadata={
        "help": "a local folder for a disk tier below host memory: tensors that do not fit in host_limit spill there "
                "(one sub-folder per rank, removed at exit and at the next start if a killed job left it); "
                "default: no disk tier"})
    disk_limit: Optional[int] = field(default=None, metadata={
        "unit": "bytes", "help": "cap on spilled bytes in disk_dir per rank; default: the free space there"})
    verify: bool = field(default=False, metadata={
        "help": "check each spilled tensor read back from disk with a CRC32 of its bytes (its size is always checked)"})
    recompute: Union[str, List[str], None] = field(default=None, metadata={
        "help": "layers recomputed in backward instead of swapped: 'auto', or a list of kinds ("
                + ", ".join(RECOMPUTE_KINDS) + ") and/or module names from named_modules() (dotted paths, e.g. blocks.0.mlp; "
                "module:NAME for a top-level module)"})
    transport: str = field(default="auto", metadata={
        "choices": TRANSPORTS.choices(),
        "help": "how swapped bytes move: " + ", ".join(TRANSPORTS.names()) + "; auto: cuda on a CUDA device, "
                "else loopback"})
    plan: str = field(default="none", metadata={
        "help": "none: the threshold/budget/keep_last rules above; auto: rank 0 profiles one step at job start "
                "and plans keep/swap/recompute for memory_target (all ranks get its plan); or a plan file "
                "from 'lmsrun plan --write'"})
    memory_target: Optional[int] = field(default=None, metadata={
        "unit": "bytes",
        "help": "device memory the planned step must fit (plan: auto); default on a GPU: its total memory"})
    trace: Optional[str] = field(default=None, metadata={
        "help": "write chrome-trace JSON of compute / swap-out / swap-in / stall spans and the saved-bytes counter "
                "of the steps train.trace_steps names to this path ({output_dir}, {rank} are replaced)"})
