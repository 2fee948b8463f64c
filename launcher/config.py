"""YAML config -> typed dataclasses, with ``--set a.b=v`` overrides and one-line errors.

Every section is a dataclass; field metadata drives validation and the README reference table:
``help`` (meaning), ``unit="bytes"`` (accepts ``1MiB``), ``choices`` (allowed strings), ``min``
(smallest number). Errors name the key path and what is allowed, and raise ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from lmsdp.comm.config import CommConfig
from lmsdp.swapping.config import SwapConfig
from lmsdp.swapping.units import parse_size

from .errors import ConfigError
from .models import MODEL_NAMES


@dataclass
class ModelConfig:
    """Which network to train: a zoo model by name, or your own through ``factory``."""

    name: str = field(default="resnet18", metadata={
        "help": "zoo model: " + ", ".join(MODEL_NAMES) + " (ignored when factory is set)"})
    factory: Optional[str] = field(default=None, metadata={
        "help": "'package.module:function' returning an nn.Module; called with kwargs"})
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments for the zoo model or the factory (e.g. depth, width, layers)"})


@dataclass
class DataConfig:
    """Training data: seeded synthetic batches, or a map-style Dataset from ``factory``."""

    kind: str = field(default="synthetic", metadata={
        "choices": ("synthetic", "factory"), "help": "synthetic batches or a Dataset from factory"})
    task: str = field(default="auto", metadata={
        "choices": ("auto", "classify", "lm", "segment", "regress"),
        "help": "what the targets are; auto follows the model (resnet: classify, gpt: lm, unet3d: segment)"})
    shape: Optional[List[int]] = field(default=None, metadata={
        "help": "shape of one input sample; default follows the model (e.g. [3, 32, 32])"})
    classes: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "number of classes / vocabulary size; default follows the model"})
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


@dataclass
class TrainConfig:
    """The training loop: length, batch, seed, logging, checkpoints."""

    steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps to run (0: use epochs)"})
    epochs: int = field(default=1, metadata={"min": 0, "help": "epochs over data.samples when steps is 0"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "samples per rank per step"})
    seed: int = field(default=0, metadata={"help": "seed for weights, data and dropout"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "steps between log lines when not on a terminal"})
    amp: bool = field(default=False, metadata={"help": "mixed precision autocast (GradScaler for float16)"})
    amp_dtype: str = field(default="bfloat16", metadata={
        "choices": ("bfloat16", "float16"), "help": "autocast dtype"})
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
    threads: int = field(default=0, metadata={
        "min": 0, "help": "intra-op threads per rank (0: cores per node / ranks per node)"})


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
        return os.path.join(self.output_dir, "checkpoints")


# --------------------------------------------------------------------------------------------
# loading


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> Config:
    """Read YAML ``path`` (None: defaults), apply ``KEY=VALUE`` overrides, validate, return Config."""
    raw: Dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    config = build(Config, raw, "")
    config.source = path
    check_config(config)
    return config


def read_yaml(path: str) -> Dict[str, Any]:
    """Parse a YAML mapping, turning OS and syntax errors into one-line ConfigErrors."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config path is a directory, expected a YAML file: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to the raw mapping."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. swap.threshold=1MiB), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    cls: Any = Config
    target = raw
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        sub_cls = None
        if cls is not None:  # None: inside a free-form mapping such as model.kwargs
            fields = _fields(cls)
            if part not in fields:
                raise _unknown_key(path, part, fields)
            sub_cls = _dataclass_of(fields[part])
        if depth == len(parts) - 1:
            target[part] = value
            return
        if sub_cls is None and cls is not None and not _is_mapping_type(fields[part]):
            raise ConfigError(f"--set {path}: '{path}' is a value, not a section; use --set {path}=VALUE")
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            node = target[part] = {}
        target, cls = node, sub_cls


def build(cls: Any, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from mapping ``data`` at key ``path``, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {_describe(data)}")
    fields = _fields(cls)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(_join(path, str(key)), str(key), fields)
    kwargs = {}
    for name, fld in fields.items():
        if name in data:
            kwargs[name] = convert(data[name], fld, _join(path, name))
    return cls(**kwargs)


def convert(value: Any, fld: "dataclasses.Field[Any]", path: str) -> Any:
    """Check and convert one value against its field's type and metadata."""
    meta = fld.metadata
    hint = fld.type
    sub = _dataclass_of(fld)
    if sub is not None:
        return build(sub, value, path)
    optional, inner = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: a value is required ({_allowed(inner, meta)})")
    if meta.get("unit") == "bytes":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return _convert_type(value, inner, meta, path)


def _convert_type(value: Any, hint: Any, meta: typing.Mapping[str, Any], path: str) -> Any:
    origin = typing.get_origin(hint)
    choices = meta.get("choices")
    if origin is Union:  # e.g. Union[str, List[str]] for swap.recompute
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        for option in options:
            if _matches(value, option):
                return _convert_type(value, option, meta, path)
        raise ConfigError(f"{path}: expected {_allowed(hint, meta)}, got {_describe(value)}")
    if origin in (list, List):
        (item_type,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_type)}, got {_describe(value)}")
        return [_convert_type(v, item_type, meta, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        _check_min(value, meta, path)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        _check_min(value, meta, path)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: '{value}' is not allowed{guess}; allowed: {', '.join(choices)}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint!r}")  # programming error surfaced plainly


def check_config(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if config.model.factory:
        resolve_factory(config.model.factory, "model.factory")
    elif config.model.name not in MODEL_NAMES:
        close = difflib.get_close_matches(config.model.name, MODEL_NAMES, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.name: unknown model '{config.model.name}'{guess}; "
                          f"allowed: {', '.join(MODEL_NAMES)}, or set model.factory")
    if config.data.kind == "factory":
        if not config.data.factory:
            raise ConfigError("data.factory: required when data.kind is 'factory' ('package.module:function')")
        resolve_factory(config.data.factory, "data.factory")
    elif config.data.factory:
        raise ConfigError("data.factory: set data.kind to 'factory' to use it (data.kind is 'synthetic')")
    if config.data.shape is not None and (not config.data.shape or any(d < 1 for d in config.data.shape)):
        raise ConfigError(f"data.shape: expected a non-empty list of positive integers, got {config.data.shape}")
    if config.train.steps == 0 and config.train.epochs == 0:
        raise ConfigError("train.steps and train.epochs are both 0: set one of them to a positive number")
    if config.launch.hosts and config.launch.hostfile:
        raise ConfigError("launch.hosts and launch.hostfile are both set: use one of them")
    if config.launch.hostfile and not os.path.isfile(config.launch.hostfile):
        raise ConfigError(f"launch.hostfile: file not found: {config.launch.hostfile}")
    recompute = config.swap.recompute
    if isinstance(recompute, list) and "auto" in recompute:
        raise ConfigError("swap.recompute: 'auto' stands alone, not inside a list")
    if config.swap.keep_last < 0 or config.swap.prefetch < 0:
        raise ConfigError("swap.prefetch and swap.keep_last must be 0 or more")
    if config.swap.plan not in ("none", "auto") and not os.path.isfile(config.swap.plan):
        raise ConfigError(f"swap.plan: '{config.swap.plan}' is not a file; allowed: none, auto, or a plan file "
                          "written by 'lmsrun plan --write'")


def resolve_factory(spec: str, path: str) -> Any:
    """Import 'package.module:function' and return the callable, or raise a ConfigError naming ``path``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{path}: expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(f"{path}: cannot import module '{module_name}': {type(exc).__name__}: {exc}",
                          hint="is it installed, or on PYTHONPATH?") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{path}: module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{path}: '{spec}' is not callable")
    return target


def config_to_dict(config: Any) -> Dict[str, Any]:
    """Plain nested dict of a config (round-trips through ``build``); internal fields left out."""
    out: Dict[str, Any] = {}
    for fld in dataclasses.fields(config):
        if fld.metadata.get("internal"):
            continue
        value = getattr(config, fld.name)
        out[fld.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def reference_rows(cls: Any = Config, prefix: str = "") -> List[tuple]:
    """(key, type, default, meaning) for every key: the README's config reference."""
    rows = []
    for name, fld in _fields(cls).items():
        path = _join(prefix, name)
        sub = _dataclass_of(fld)
        if sub is not None:
            rows.extend(reference_rows(sub, path))
            continue
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]
        rows.append((path, _allowed(_unwrap_optional(fld.type)[1], fld.metadata), default, fld.metadata.get("help", "")))
    return rows


# --------------------------------------------------------------------------------------------
# helpers

_HINTS: Dict[type, Dict[str, Any]] = {}


def _fields(cls: Any) -> Dict[str, "dataclasses.Field[Any]"]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        result = {}
        for fld in dataclasses.fields(cls):
            if fld.metadata.get("internal"):
                continue
            fld.type = hints[fld.name]
            result[fld.name] = fld
        _HINTS[cls] = result
    return _HINTS[cls]


def _dataclass_of(fld: Any) -> Any:
    hint = fld.type if isinstance(fld, dataclasses.Field) else fld
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _is_mapping_type(fld: Any) -> bool:
    return typing.get_origin(_unwrap_optional(fld.type)[1]) in (dict, Dict)


def _unwrap_optional(hint: Any) -> tuple:
    if typing.get_origin(hint) is Union:
        args = typing.get_args(hint)
        if type(None) in args:
            rest = [a for a in args if a is not type(None)]
            return True, (rest[0] if len(rest) == 1 else Union[tuple(rest)])
    return False, hint


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, List):
        return isinstance(value, list)
    if hint is str:
        return isinstance(value, str)
    return True


def _unknown_key(path: str, key: str, fields: Dict[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key, list(fields), n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{path}: unknown key{guess}; allowed here: {', '.join(fields)}")


def _check_min(value: float, meta: typing.Mapping[str, Any], path: str) -> None:
    low = meta.get("min")
    if low is not None and value < low:
        raise ConfigError(f"{path}: must be >= {low}, got {value}")


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "integer", float: "number", str: "string", Any: "any value"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    return getattr(hint, "__name__", str(hint))


def _allowed(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    if meta.get("unit") == "bytes":
        return "size (e.g. 1MiB)"
    if meta.get("choices"):
        return _type_name(hint) + ": " + " | ".join(meta["choices"])
    return _type_name(hint)


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
