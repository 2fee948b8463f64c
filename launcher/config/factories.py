"""A user's code named in the config as 'package.module:function': resolving it, checking the model
section against it (model.factory, model.config_factory, model.pass_labels, model.kwargs) and
train.loss's signature, and building the model from it. Every failure is one ConfigError line."""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from lmsdp.launcher.models import MODEL_NAMES

from .errors import ConfigError
from .input_checks import built_by_factory, check_config_kwargs, check_optimizer_kwargs


def check_model(config: Any) -> None:
    """model.name or model.factory (with model.config_factory), and model.kwargs against what takes them."""
    model = config.model
    if model.config_factory and not model.factory:
        raise ConfigError("model.config_factory: needs model.factory, the class or function its config is "
                          "passed to (e.g. transformers:GPT2LMHeadModel)")
    if model.factory:
        factory = resolve_factory(model.factory, "model.factory")
        if model.config_factory:  # built here (a config is cheap): its signature may not list every key
            make_config = resolve_factory(model.config_factory, "model.config_factory")
            try:
                built_by_factory(make_config, model.kwargs, "model.config_factory", model.config_factory, object)
            except ConfigError:
                check_config_kwargs(config, make_config, f"model.config_factory '{model.config_factory}'")
                raise
            check_optimizer_kwargs(config)
        else:
            check_config_kwargs(config, factory)
    elif model.name not in MODEL_NAMES:
        close = difflib.get_close_matches(model.name, MODEL_NAMES, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.name: unknown model '{model.name}'{guess}; "
                          f"allowed: {', '.join(MODEL_NAMES)}, or set model.factory")
    elif model.pass_labels:
        raise ConfigError(f"model.pass_labels: zoo model '{model.name}' computes no loss from labels; "
                          "allowed: false, or true with a model.factory whose forward takes labels=")
    else:
        check_config_kwargs(config, None)


def check_user_loss(spec: str) -> None:
    """train.loss names a function that can be called as f(output, target)."""
    loss = resolve_factory(spec, "train.loss")
    try:
        inspect.signature(loss).bind(None, None)
    except TypeError:
        raise ConfigError(f"train.loss: '{spec}' cannot be called as f(output, target); "
                          f"its signature is {inspect.signature(loss)}") from None
    except ValueError:  # a builtin without a signature: the first step tells
        pass


def model_from_factory(model: Any, expected: type) -> Any:
    """``factory(**kwargs)``, or ``factory(config_factory(**kwargs))`` (Hugging Face: a model class or
    ``AutoModelForCausalLM.from_config`` with its config class); failures are one line."""
    factory = resolve_factory(model.factory or "", "model.factory")
    if not model.config_factory:
        return built_by_factory(factory, model.kwargs, "model.factory", model.factory or "", expected)
    made = built_by_factory(resolve_factory(model.config_factory, "model.config_factory"), model.kwargs,
                            "model.config_factory", model.config_factory, object)
    return built_by_factory(factory, {}, "model.factory", model.factory or "", expected, args=(made,))


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
