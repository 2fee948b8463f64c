"""Typed YAML: a mapping of plain values -> nested dataclasses, checked key by key.

Generic over any dataclass schema (lmsdp's is in ``launcher/config/schema.py``). Field metadata drives
validation and reference tables: ``help`` (meaning), ``unit="bytes"`` (accepts ``1MiB``), ``choices``
(allowed strings), ``min`` (smallest number), ``internal`` (not a key). Every error is one
``ConfigError`` line that names the key path and what is allowed, with a did-you-mean.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from typing import Any, Dict, List, Union

import yaml

from lmsdp.swapping.units import parse_size

from .errors import ConfigError


def read_yaml(path: str) -> Dict[str, Any]:
    """Parse a YAML mapping, turning OS and syntax errors into one-line ConfigErrors."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config path is a directory, expected a YAML file: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        label = "" if problem.startswith("duplicate key") else "YAML syntax error: "
        raise ConfigError(f"{where}: {label}{problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML lets the second win:
    a second ``train:`` section would silently replace the whole first one)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first.line + 1}); "
                                "each key may appear once per section", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def apply_override(raw: Dict[str, Any], item: str, root: Any) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to the raw mapping of dataclass ``root``."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. swap.threshold=1MiB), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    cls: Any = root
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
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {value} is not allowed; expected a finite {_allowed(inner, meta)}")
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
                if option is str and choices and value not in choices and len(options) > 1:
                    close = difflib.get_close_matches(value, choices, n=1)
                    guess = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{path}: '{value}' is not allowed{guess}; allowed: {_allowed(hint, meta)}")
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
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not allowed; expected a finite number")
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


def config_to_dict(config: Any) -> Dict[str, Any]:
    """Plain nested dict of a config (round-trips through ``build``); internal fields left out."""
    out: Dict[str, Any] = {}
    for fld in dataclasses.fields(config):
        if fld.metadata.get("internal"):
            continue
        value = getattr(config, fld.name)
        out[fld.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def reference_rows(cls: Any, prefix: str = "") -> List[tuple]:
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
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    return True


def _unknown_key(path: str, key: str, fields: Dict[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key, list(fields), n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{path}: unknown key{guess}; allowed here: {', '.join(fields)}")


def _check_min(value: float, meta: typing.Mapping[str, Any], path: str) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{path}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{path}: must be <= {high}, got {value}")


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
