"""Checks of user input that types alone cannot express, each failing as one ``ConfigError`` /
``UserError`` line (exit 2) before any rank starts: the job name, keyword arguments against the
signature they are passed to, hosts that do not resolve, and what a user's factory builds."""
from __future__ import annotations

import difflib
import inspect
import re
import socket
from typing import Any, Callable, Dict, Iterable, Optional

from .errors import ConfigError, UserError

NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.+ -]*[A-Za-z0-9_.+-])?$")  # a file name; inner spaces allowed


def check_name(name: str) -> None:
    """``name`` becomes part of paths (runs/{name}): a plain file name, never ``..`` or a slash."""
    if not NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"name: {name!r} is not allowed; use letters, digits, inner spaces and _ . + - "
                          "(no slashes, not starting with '.' or '-')")


def check_kwargs(target: Callable[..., Any], kwargs: Dict[str, Any], path: str, what: str,
                 given_elsewhere: Iterable[str] = ()) -> None:
    """Every key of ``kwargs`` is a parameter of ``target`` (unless it takes ``**kwargs``)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature: it reports bad keys itself
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.KEYWORD_ONLY)
               and n not in ("self", "params")]
    for key in kwargs:
        if key in given_elsewhere:
            raise ConfigError(f"{path}.{key}: set it as its own key ({path.rsplit('.', 1)[0]}.{key}), not in kwargs")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}.{key}: {what} takes no argument '{key}'{guess}; "
                              f"allowed: {', '.join(allowed) or 'none'}")


def check_config_kwargs(config: Any, factory: Optional[Callable[..., Any]], what: str = "") -> None:
    """model.kwargs against the zoo model's constructor or the factory (``what`` names it: the
    model factory by default); optimizer.kwargs against the torch optimizer (lr, momentum,
    weight_decay are keys of their own)."""
    if factory is not None:
        check_kwargs(factory, config.model.kwargs, "model.kwargs", what or f"model.factory '{config.model.factory}'")
    else:
        from lmsdp.launcher.models import ZOO

        entry = ZOO[config.model.name]
        check_kwargs(entry.build, config.model.kwargs, "model.kwargs", f"model '{config.model.name}'")
    check_optimizer_kwargs(config)


def check_optimizer_kwargs(config: Any) -> None:
    """optimizer.kwargs against the torch optimizer (lr, momentum, weight_decay are keys of their own)."""
    import torch

    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer.name]
    check_kwargs(cls, config.optimizer.kwargs, "optimizer.kwargs", f"optimizer '{config.optimizer.name}'",
                 given_elsewhere=("lr", "momentum", "weight_decay"))


def built_by_factory(factory: Callable[..., Any], kwargs: Dict[str, Any], path: str, spec: str,
                     expected: type, args: tuple = ()) -> Any:
    """Call the user's factory (``args``: a config object built before, see model.config_factory);
    an exception or a wrong return type is one line naming ``path``."""
    try:
        made = factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code: its failure is theirs to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        called = f"({type(args[0]).__name__})" if args else f"(**{path.split('.')[0]}.kwargs)"
        raise ConfigError(f"{path}: {spec}{called} raised "
                          f"{type(exc).__name__}{': ' + first if first else ''}") from None
    if not isinstance(made, expected):
        raise ConfigError(f"{path}: {spec} returned {type(made).__name__}; expected a "
                          f"{expected.__module__}.{expected.__qualname__}")
    return made


def check_hosts_resolve(names: Iterable[str], flag: str) -> None:
    """Each host name resolves (mpirun would otherwise print 20-30 lines about it)."""
    for name in names:
        try:
            socket.getaddrinfo(name, None)
        except (socket.gaierror, UnicodeError) as exc:
            raise UserError(f"{flag}: host '{name}' does not resolve ({exc.strerror or exc}); "
                            "expected a reachable host name or address") from None
