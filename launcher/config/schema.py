"""The job's config schema (one dataclass per YAML section), loading with ``--set a.b=v`` overrides,
and the cross-field checks that types alone cannot express.

Field metadata (``help``, ``unit``, ``choices``, ``min``) drives validation and the README reference
table; the generic typed-YAML machinery is in ``launcher/config/typed_yaml.py``.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from lmsdp.comm.config import CommConfig
from lmsdp.runtime.network import check_spec
from lmsdp.runtime.trace_schedule import DEFAULT_STEPS, TraceSchedule
from lmsdp.swapping.config import SwapConfig
from .errors import ConfigError, UserError
from .factories import check_model, check_user_loss, model_from_factory, resolve_factory
from .input_checks import check_name
from .typed_yaml import apply_override, build, config_to_dict, read_yaml, reference_rows
from lmsdp.launcher.models import MODEL_NAMES
from lmsdp.runtime import run_folder


@dataclass
class ModelConfig:
    """Which network to train: a zoo model by name, or your own through ``factory``."""

    name: str = field(default="resnet18", metadata={
        "help": "zoo model: " + ", ".join(MODEL_NAMES) + " (ignored when factory is set)"})
    factory: Optional[str] = field(default=None, metadata={
        "help": "'package.module:function' returning an nn.Module; called with kwargs"})
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments for the zoo model or the factory (e.g. depth, width, layers); "
                "with config_factory, for the config instead"})
    config_factory: Optional[str] = field(default=None, metadata={
        "help": "'package.module:Class' building a config from kwargs; the factory is then called with it "
                "(transformers:GPT2Config with factory transformers:GPT2LMHeadModel)"})
    pass_labels: bool = field(default=False, metadata={
        "help": "call forward(inputs, labels=targets) and train on the loss the model returns "
                "(Hugging Face; task lm passes the input tokens, which the model shifts)"})


@dataclass
class DataConfig:
    """Training data: seeded synthetic samples, a token file, an image folder, or a user's Dataset;
    loaded by DataLoader workers in the order the rank's sampler gives (a pure function of seed and step)."""

    kind: str = field(default="synthetic", metadata={
        "choices": ("synthetic", "tokens", "image_folder", "factory"),
        "help": "synthetic samples (targets a fixed function of the inputs), tokens (path: flat token file), "
                "image_folder (path: one subfolder per class), or a Dataset from factory"})
    path: Optional[str] = field(default=None, metadata={
        "help": "tokens: the token file ('lmsrun data tokens' makes one); image_folder: the folder"})
    dtype: str = field(default="uint16", metadata={"choices": ("uint16", "uint32"), "help": "tokens: id type"})
    val_path: Optional[str] = field(default=None, metadata={"help": "validation token file or image folder"})
    val_fraction: float = field(default=0.0, metadata={
        "min": 0.0, "max": 0.5, "help": "held-out fraction for validation when val_path is not given"})
    workers: Union[int, str] = field(default="auto", metadata={
        "choices": ("auto",), "help": "DataLoader worker processes per rank (auto: 0 for synthetic, else up "
                                      "to 2, taken from the rank's intra-op threads)"})
    prefetch: int = field(default=2, metadata={"min": 1, "help": "batches each worker loads ahead"})
    pin_memory: Union[bool, str] = field(default="auto", metadata={
        "choices": ("auto",), "help": "pinned host batches (auto: when the device is CUDA)"})
    task: str = field(default="auto", metadata={
        "choices": ("auto", "classify", "lm", "segment", "regress"),
        "help": "what the targets are; auto follows the model (resnet: classify, gpt: lm, unet3d: segment)"})
    shape: Optional[List[int]] = field(default=None, metadata={
        "help": "shape of one input sample; default follows the model (e.g. [3, 32, 32])"})
    classes: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "number of classes / vocabulary size; default follows the model"})
    vocab: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "synthetic inputs are token ids below this (text models); default: lm draws tokens "
                          "below classes, other tasks draw float inputs"})
    samples: int = field(default=4096, metadata={
        "min": 1, "help": "samples in one epoch (all ranks together) for synthetic data"})
    factory: Optional[str] = field(default=None, metadata={
        "help": "'package.module:function' returning a map-style Dataset of (input, target)"})
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments for the data factory"})


@dataclass
class OptimizerConfig:
    """Optimizer and its arguments."""

    name: str = field(default="sgd", metadata={"choices": ("sgd", "adam", "adamw"), "help": "optimizer"})
    lr: float = field(default=0.1, metadata={"min": 0.0, "help": "learning rate"})
    momentum: float = field(default=0.0, metadata={"min": 0.0, "help": "momentum (sgd only)"})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0, "help": "weight decay"})
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "further keyword arguments for the torch optimizer (e.g. betas, nesterov)"})
    schedule: str = field(default="constant", metadata={
        "choices": ("constant", "cosine", "linear"), "help": "learning-rate schedule after the warm-up"})
    warmup_steps: int = field(default=0, metadata={"min": 0, "help": "steps of linear warm-up from 0 to lr"})
    min_lr: float = field(default=0.0, metadata={"min": 0.0, "help": "where cosine and linear decay end"})


@dataclass
class EvalConfig:
    """Validation during training: loss and accuracy (or perplexity) averaged over every rank."""

    every: int = field(default=0, metadata={"min": 0, "help": "steps between evaluations (0: off)"})
    steps: int = field(default=4, metadata={"min": 1, "help": "validation batches per rank per evaluation"})


@dataclass
class TrainConfig:
    """The training loop: length, batch, seed, logging, checkpoints."""

    steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps to run (0: use epochs)"})
    epochs: int = field(default=1, metadata={"min": 0, "help": "epochs over data.samples when steps is 0"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "samples per rank per micro-batch"})
    accumulate: int = field(default=1, metadata={
        "min": 1, "help": "micro-batches per optimizer step (gradient accumulation; one swap-engine step each)"})
    seed: int = field(default=0, metadata={"help": "seed for weights, data and dropout"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "steps between log lines when not on a terminal"})
    amp: bool = field(default=False, metadata={"help": "mixed precision autocast (GradScaler for float16)"})
    amp_dtype: str = field(default="bfloat16", metadata={
        "choices": ("bfloat16", "float16"), "help": "autocast dtype"})
    clip_grad_norm: float = field(default=0.0, metadata={
        "min": 0.0, "help": "clip the global gradient norm to this before each step (0: off)"})
    deterministic: bool = field(default=False, metadata={
        "help": "torch.use_deterministic_algorithms for bit-exact reruns"})
    output_dir: str = field(default="runs/{name}", metadata={
        "help": "metrics JSONL, logs and summary; {name} is the config name"})
    checkpoint_dir: Optional[str] = field(default=None, metadata={
        "help": "where checkpoints go (default: <output_dir>/checkpoints)"})
    checkpoint_every: int = field(default=0, metadata={
        "min": 0, "help": "steps between checkpoints (0: only at the end and on SIGTERM/SIGINT/SIGUSR1)"})
    keep_checkpoints: int = field(default=3, metadata={"min": 1, "help": "newest checkpoints kept on disk"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest valid checkpoint in checkpoint_dir, if any"})
    progress: bool = field(default=True, metadata={"help": "progress bar / log lines on rank 0"})
    loss: Optional[str] = field(default=None, metadata={
        "help": "'package.module:function' computing the loss as f(output, target) -> scalar tensor "
                "(default: from the task, read from the model's output)"})
    aux_weight: float = field(default=0.3, metadata={
        "min": 0.0, "help": "weight of each auxiliary head's loss (torchvision aux_logits, 'aux' outputs)"})
    tensorboard: bool = field(default=False, metadata={
        "help": "rank 0 writes the per-step scalars to <output_dir>/tb (needs the tensorboard package)"})
    trace_steps: List[int] = field(default_factory=lambda: list(DEFAULT_STEPS), metadata={
        "help": "[first, last] step recorded by swap.trace and comm.timeline (traces of every step would "
                "grow without end)"})
    trace_every: int = field(default=0, metadata={
        "min": 0, "help": "repeat the trace_steps window every N steps (0: record it once)"})

    @property
    def trace_schedule(self) -> TraceSchedule:
        """The steps swap.trace and comm.timeline record (checked by ``check_config``)."""
        return TraceSchedule(self.trace_steps[0], self.trace_steps[-1], self.trace_every)


@dataclass
class LaunchConfig:
    """How ranks are started (flags of the same names override these)."""

    np: int = field(default=1, metadata={"min": 1, "help": "number of ranks (one per GPU); -np"})
    hosts: Optional[str] = field(default=None, metadata={
        "help": "'host1:slots,host2:slots' as in horovodrun -H; default: this machine"})
    hostfile: Optional[str] = field(default=None, metadata={"help": "Open MPI / horovodrun hostfile; --hostfile"})
    mpi_args: str = field(default="", metadata={"help": "extra arguments passed to mpirun verbatim"})
    oversubscribe: bool = field(default=False, metadata={
        "help": "allow more ranks than cores (added anyway when ranks exceed local cores)"})
    threads: Union[int, str] = field(default=0, metadata={
        "min": 0, "choices": ("auto",),
        "help": "intra-op threads per rank (0: cores per node / ranks per node; auto: measured per module, "
                "see launcher/train/threads.py)"})
    interop_threads: int = field(default=0, metadata={
        "min": 0, "help": "inter-op threads per rank (0: torch's default)"})


@dataclass
class SlurmConfig:
    """Defaults for ``lmsrun slurm`` (flags of the same names override these)."""

    nodes: int = field(default=1, metadata={"min": 1, "help": "nodes to allocate"})
    gpus_per_node: int = field(default=0, metadata={"min": 0, "help": "GPUs (= tasks) per node; 0: CPU, launch.np tasks"})
    time: str = field(default="01:00:00", metadata={"help": "wall-time limit (sbatch --time)"})
    partition: Optional[str] = field(default=None, metadata={"help": "sbatch --partition"})
    account: Optional[str] = field(default=None, metadata={"help": "sbatch --account"})
    launcher: str = field(default="srun", metadata={
        "choices": ("srun", "mpirun"), "help": "start ranks with srun --mpi=pmix or mpirun inside the allocation"})
    signal_seconds: int = field(default=90, metadata={
        "min": 0, "help": "seconds before the time limit that USR1 asks ranks to checkpoint"})
    requeue: bool = field(default=False, metadata={
        "help": "after a preemption/time-limit checkpoint, requeue the job; it resumes automatically"})


@dataclass
class Config:
    """A whole job."""

    name: str = field(default="lmsdp", metadata={"help": "job name (output paths, Slurm job name)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    source: Optional[str] = field(default=None, compare=False, metadata={"internal": True})

    @property
    def output_dir(self) -> str:
        return self.train.output_dir.replace("{name}", self.name)

    @property
    def checkpoint_dir(self) -> str:
        if self.train.checkpoint_dir:
            return self.train.checkpoint_dir.replace("{name}", self.name)
        return os.path.join(self.output_dir, run_folder.CHECKPOINTS)


# --------------------------------------------------------------------------------------------
# loading


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> Config:
    """Read YAML ``path`` (None: defaults), apply ``KEY=VALUE`` overrides, validate, return Config."""
    raw: Dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    empty = path is not None and not raw
    for item in overrides or []:
        apply_override(raw, item, Config)
    config = build(Config, raw, "")
    if empty:  # would train every default for minutes
        raise ConfigError(f"{path}: the config is empty; expected sections such as model:, train: "
                          "(see configs/quickstart.yaml)")
    config.source = path
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    check_name(config.name)
    check_model(config)
    if config.train.loss:
        check_user_loss(config.train.loss)
    _check_data(config.data)
    if config.train.accumulate > 1 and config.comm.backward_passes_per_step not in (1, config.train.accumulate):
        raise ConfigError(f"comm.backward_passes_per_step: {config.comm.backward_passes_per_step} disagrees with "
                          f"train.accumulate: {config.train.accumulate}; set train.accumulate only (it sets the other)")
    if config.data.shape is not None and (not config.data.shape or any(d < 1 for d in config.data.shape)):
        raise ConfigError(f"data.shape: expected a non-empty list of positive integers, got {config.data.shape}")
    if config.train.steps == 0 and config.train.epochs == 0:
        raise ConfigError("train.steps and train.epochs are both 0: set one of them to a positive number")
    _check_trace_schedule(config.train)
    if config.launch.hosts and config.launch.hostfile:
        raise ConfigError("launch.hosts and launch.hostfile are both set: use one of them")
    if config.launch.hostfile and not os.path.isfile(config.launch.hostfile):
        raise ConfigError(f"launch.hostfile: file not found: {config.launch.hostfile}")
    interface_problem = check_spec(config.comm.interface)
    if interface_problem:
        raise ConfigError(f"comm.interface: {interface_problem}")
    recompute = config.swap.recompute
    if isinstance(recompute, list) and "auto" in recompute:
        raise ConfigError("swap.recompute: 'auto' stands alone, not inside a list")
    _check_recompute_entries(recompute)
    if config.comm.strategy == "shard" and config.comm.backend == "horovod":
        raise ConfigError("comm.backend: horovod has no sharding (comm.strategy is 'shard'); "
                          "use comm.backend: torch (or auto, which picks torch for shard)")
    _check_mesh(config.comm)
    if config.swap.keep_last < 0 or config.swap.prefetch < 0:
        raise ConfigError("swap.prefetch and swap.keep_last must be 0 or more")
    if config.swap.link_gbps is not None:
        if config.swap.link_gbps <= 0:
            raise ConfigError(f"swap.link_gbps: expected a positive number of GB/s, got {config.swap.link_gbps:g}; "
                              "leave it unset for an unlimited link")
        if config.swap.transport == "cuda":
            raise ConfigError("swap.link_gbps: paces the loopback transport only (a simulated link); "
                              "allowed with transport: loopback or auto, not cuda")
    if config.swap.plan not in ("none", "auto") and not os.path.isfile(config.swap.plan):
        raise ConfigError(f"swap.plan: '{config.swap.plan}' is not a file; allowed: none, auto, or a plan file "
                          "written by 'lmsrun plan --write'")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)




def config_reference_rows() -> List[tuple]:
    """(key, type, default, meaning) for every key of the job config: the README's reference."""
    return reference_rows(Config)


__all__ = ["Config", "ConfigError", "build", "config_to_dict", "dump_config", "load_config", "read_yaml",
           "check_config", "resolve_factory", "model_from_factory", "config_reference_rows"]


_MODULE_NAME = re.compile(r"^(module:)?[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def _check_recompute_entries(recompute: Any) -> None:
    """Each swap.recompute entry is a kind or a module name (the model, built later, checks the name)."""
    from lmsdp.swapping.config import RECOMPUTE_KINDS

    entries = [recompute] if isinstance(recompute, str) else list(recompute or [])
    for i, entry in enumerate(entries):
        if entry.strip().lower() in ("auto",) + RECOMPUTE_KINDS:
            continue
        if ("." in entry or entry.startswith("module:")) and _MODULE_NAME.match(entry):
            continue
        close = difflib.get_close_matches(entry.lower(), ("auto",) + RECOMPUTE_KINDS, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        where = "swap.recompute" if isinstance(recompute, str) else f"swap.recompute[{i}]"
        raise ConfigError(f"{where}: '{entry}' is not allowed{guess}; allowed: auto, " + ", ".join(RECOMPUTE_KINDS)
                          + ", or module names: dotted paths from named_modules() (blocks.0.mlp) or module:NAME")


def _check_mesh(comm: Any) -> None:
    """comm.mesh's keys and sizes (D x T = world is checked once the world size is known), Horovod + tp."""
    from lmsdp.comm.mesh import check_mesh_value, is_auto, wants_tensor_parallel

    try:
        check_mesh_value(comm.mesh)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    if comm.backend == "horovod" and wants_tensor_parallel(comm.mesh):
        what = "auto may pick tp > 1" if is_auto(comm.mesh) else "tp > 1 splits layers over ranks"
        raise ConfigError(f"comm.backend: horovod has no tensor parallelism (comm.mesh: {what}); use comm.backend: "
                          "torch (or auto, which picks torch for a mesh with tp)")


def _check_data(data: DataConfig) -> None:
    """The keys each data.kind needs, and no key it would ignore."""
    if data.kind == "factory":
        if not data.factory:
            raise ConfigError("data.factory: required when data.kind is 'factory' ('package.module:function')")
        resolve_factory(data.factory, "data.factory")
    elif data.factory:
        raise ConfigError(f"data.factory: set data.kind to 'factory' to use it (data.kind is '{data.kind}')")
    if data.kind in ("tokens", "image_folder"):
        if not data.path:
            raise ConfigError(f"data.path: required when data.kind is '{data.kind}'")
        if not os.path.exists(data.path):
            raise ConfigError(f"data.path: not found: {data.path}")
    elif data.path or data.val_path:
        raise ConfigError(f"data.{'path' if data.path else 'val_path'}: only for data.kind tokens or image_folder "
                          f"(data.kind is '{data.kind}')")
    if data.val_path and not os.path.exists(data.val_path):
        raise ConfigError(f"data.val_path: not found: {data.val_path}")
    if isinstance(data.workers, int) and data.workers < 0:
        raise ConfigError(f"data.workers: must be >= 0 or auto, got {data.workers}")


def _check_trace_schedule(train: TrainConfig) -> None:
    """train.trace_steps is [first, last] with 1 <= first <= last; a repeat is longer than the window."""
    window = train.trace_steps
    if len(window) != 2 or window[0] < 1 or window[1] < window[0]:
        raise ConfigError(f"train.trace_steps: {window} is not a step window; allowed: [first, last] with "
                          "1 <= first <= last, e.g. [10, 14]")
    length = window[1] - window[0] + 1
    if 0 < train.trace_every < length:
        raise ConfigError(f"train.trace_every: {train.trace_every} is shorter than the trace_steps window "
                          f"({length} steps); allowed: 0 (record the window once) or {length} or more")
