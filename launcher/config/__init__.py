"""Configuration: the typed YAML schema (``schema``), its reader (``typed_yaml``), input checks, flag
types and the user-facing error classes. Below everything else in ``lmsdp.launcher`` but the model zoo."""
from .errors import ConfigError, TopologyError, UserError
from .schema import (Config, DataConfig, EvalConfig, LaunchConfig, ModelConfig, OptimizerConfig, SlurmConfig, TrainConfig,
                     check_config, config_reference_rows, dump_config, load_config, model_from_factory,
                     resolve_factory)
from .typed_yaml import apply_override, build, config_to_dict, read_yaml

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "LaunchConfig", "ModelConfig", "OptimizerConfig", "SlurmConfig",
           "TopologyError", "TrainConfig", "UserError", "apply_override", "build", "check_config",
           "config_reference_rows", "config_to_dict", "dump_config", "load_config", "model_from_factory", "read_yaml",
           "resolve_factory"]
