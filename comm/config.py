"""Configuration of the gradient allreduce backend (same metadata conventions as SwapConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .registry import BACKENDS, STRATEGIES

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MixedPrecisionConfig:
    """FSDP2's MixedPrecisionPolicy under ``strategy: shard`` (None: keep the parameters' dtype)."""

    param_dtype: Optional[str] = field(default=None, metadata={
        "choices": DTYPES, "help": "dtype parameters are all-gathered and computed in (shard only)"})
    reduce_dtype: Optional[str] = field(default=None, metadata={
        "choices": DTYPES, "help": "dtype gradients are reduce-scattered in (shard only; default: param_dtype)"})


@dataclass
class CommConfig:
    """Which backend reduces gradients and how, and whether ranks replicate or shard the model."""

    strategy: str = field(default="replicate", metadata={
        "choices": STRATEGIES.names(),
        "help": "replicate: every rank holds the whole model, gradients allreduced; shard: parameters, "
                "gradients and optimizer state sharded across ranks (torch FSDP2, torch backend)"})
    shard_modules: List[str] = field(default_factory=list, metadata={
        "help": "class names of the modules sharded one by one under strategy shard (default: detected "
                "for the zoo: transformer blocks, ResNet blocks, U-Net levels)"})
    reshard_after_forward: bool = field(default=True, metadata={
        "help": "shard: free gathered parameters after forward and gather again in backward (less memory, "
                "one more all-gather)"})
    mesh: Optional[Union[str, Dict[str, Any]]] = field(default=None, metadata={
        "choices": ("auto",),
        "help": "device mesh {dp: D, tp: T} with D x T = ranks (tp ranks split each layer, comm.strategy applies "
                "along dp; torch backend); auto: the layout lmsrun plan picks; unset: {dp: ranks, tp: 1}"})
    tp_plan: Dict[str, str] = field(default_factory=dict, metadata={
        "help": "tensor parallelism by hand: {module name: colwise|rowwise|colwise_gather|gather_input|"
                "sequence_parallel|replicate} (default: the zoo model's plan, else Linear pairs and embeddings "
                "found automatically)"})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "tp > 1: norms and dropout on sequence shards (activations between blocks 1/tp per rank; "
                "all-gather + reduce-scatter instead of all-reduce)"})
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    offload: str = field(default="none", metadata={
        "choices": ("none", "optimizer_and_params"),
        "help": "shard on GPU: keep sharded parameters, gradients and optimizer state (and the update) in "
                "host memory (CPUOffloadPolicy); a no-op on CPU"})

    backend: str = field(default="auto", metadata={
        "choices": BACKENDS.choices(),
        "help": "auto = the first usable of " + ", ".join(BACKENDS.names()) + " (horovod: when horovod.torch "
                "imports, the job was not started by torchrun and strategy is replicate)"})
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
        "help": "Horovod timeline / allreduce chrome-trace path, for the steps train.trace_steps names "
                "({output_dir}, {rank} are replaced)"})
    interface: str = field(default="auto", metadata={
        "help": "network the ranks talk over: an interface name (eth0), a CIDR (10.0.0.0/8) or auto (one "
                "host: loopback; several: rank 0's interface whose network reaches every host); sets the "
                "torch store address, GLOO/NCCL_SOCKET_IFNAME, HOROVOD_GLOO_IFACE and Open MPI's tcp_if_include"})
    timeout_s: float = field(default=300.0, metadata={
        "min": 1.0,
        "help": "seconds a collective may wait for a live but stuck peer before the rank fails with an "
                "error (a dead peer fails at once); must exceed the slowest checkpoint write"})
