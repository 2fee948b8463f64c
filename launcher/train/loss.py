"""The loss of one training step for models from any library, without glue code in the model.

A model's output is read once per step (``read_output``): a tensor of logits; a dict or an object
with ``logits`` (Hugging Face's ``ModelOutput``, torchvision segmentation's ``{'out', 'aux'}``) and its
``loss`` when the model was given labels (``model.pass_labels``); a tuple or named tuple whose first
element is the logits, with torchvision's auxiliary heads (``aux_logits``, ``aux_logits1``...) weighted
by ``train.aux_weight``. Anything else is one ``ConfigError`` line, raised by the first forward,
before any backward or optimizer step. ``train.loss`` replaces all of this with the user's
``f(output, target)``. The training loop and the planner both use ``StepLoss``."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmsdp.launcher.config import Config, ConfigError, resolve_factory

from .data import data_spec

LOGITS_KEYS = ("logits", "out")  # Hugging Face / most libraries; torchvision segmentation
AUX_PREFIX = "aux"               # torchvision: aux_logits (Inception), aux_logits1/2 (GoogLeNet), aux (FCN)


def _token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float().flatten(0, 1), target.flatten())


def _class_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float(), target)  # per sample, or per pixel/voxel ([N, C, ...])


def _regress_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.float(), target.float())


TASK_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "lm": _token_loss, "classify": _class_loss, "segment": _class_loss, "regress": _regress_loss}


def compute_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The task's loss of one logits tensor (data.task picks it)."""
    return TASK_LOSSES[task](output, target)


@dataclass
class ModelOutput:
    """What a step needs from a model's output: the logits, auxiliary heads, the model's own loss."""

    logits: torch.Tensor
    aux: List[torch.Tensor] = field(default_factory=list)
    loss: Optional[torch.Tensor] = None


def read_output(output: Any) -> ModelOutput:
    """The logits (and auxiliary heads, and the model's loss) of ``output``, or one ConfigError line."""
    if torch.is_tensor(output):
        return ModelOutput(output)
    if isinstance(output, Mapping):
        return _from_named(output, dict(output))
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        names = getattr(output, "_fields", ())  # a named tuple: its aux fields are known heads
        aux = [v for n, v in zip(names, output) if n.startswith(AUX_PREFIX) and torch.is_tensor(v)]
        return ModelOutput(output[0], aux)
    if torch.is_tensor(getattr(output, "logits", None)):
        return _from_named(output, {k: getattr(output, k, None) for k in ("logits", "loss")})
    raise unreadable(output)


def _from_named(output: Any, fields: Dict[str, Any]) -> ModelOutput:
    logits = next((fields[k] for k in LOGITS_KEYS if torch.is_tensor(fields.get(k))), None)
    if logits is None:
        raise unreadable(output, f"keys {', '.join(map(str, fields)) or 'none'}")
    aux = [v for k, v in fields.items() if str(k).startswith(AUX_PREFIX) and torch.is_tensor(v)]
    loss = fields.get("loss")
    return ModelOutput(logits, aux, loss if torch.is_tensor(loss) else None)


def unreadable(output: Any, detail: str = "") -> ConfigError:
    kind = type(output)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ConfigError(
        f"model: forward returned a {name}{f' ({detail})' if detail else ''}, which is not logits: a tensor, "
        "a dict or object with 'logits', or a tuple starting with the logits; set train.loss: "
        "'package.module:function' to compute the loss from it as f(output, target), or make forward "
        "return the logits")


@dataclass
class StepLoss:
    """One step's ``forward`` (with ``labels=`` when asked) and ``loss`` (the user's, the model's own,
    or the task's on the logits plus ``aux_weight`` times each auxiliary head's)."""

    task: str
    pass_labels: bool = False
    aux_weight: float = 0.3
    user_loss: Optional[Callable[[Any, Any], Any]] = None
    user_loss_spec: str = ""
    _labels_checked: bool = field(default=False, init=False, repr=False)  # forward takes labels=

    @classmethod
    def from_config(cls, config: Config) -> "StepLoss":
        spec = config.train.loss or ""
        return cls(task=data_spec(config).task, pass_labels=config.model.pass_labels,
                   aux_weight=config.train.aux_weight, user_loss=resolve_factory(spec, "train.loss") if spec else None,
                   user_loss_spec=spec)

    def __call__(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        return self.loss(self.forward(model, inputs, targets), targets)

    def forward(self, model: nn.Module, inputs: Any, targets: Any) -> Any:
        if not self.pass_labels:
            return model(inputs)
        if not self._labels_checked:
            _check_takes_labels(model)
            self._labels_checked = True
        # Causal LMs (Hugging Face) shift the labels themselves: their labels are the input tokens.
        return model(inputs, labels=inputs if self.task == "lm" else targets)

    def loss(self, output: Any, targets: Any) -> torch.Tensor:
        if self.user_loss is not None:
            return self._users(output, targets)
        read = read_output(output)
        if self.pass_labels and read.loss is not None:
            return read.loss
        loss = compute_loss(self.task, read.logits, targets)
        for head in read.aux:
            loss = loss + self.aux_weight * compute_loss(self.task, head, targets)
        return loss

    def _users(self, output: Any, targets: Any) -> torch.Tensor:
        loss = self.user_loss(output, targets)  # type: ignore[misc]
        if not torch.is_tensor(loss) or loss.numel() != 1:
            got = f"a tensor of shape {list(loss.shape)}" if torch.is_tensor(loss) else f"a {type(loss).__name__}"
            raise ConfigError(f"train.loss: '{self.user_loss_spec}' returned {got}; expected a scalar tensor "
                              "(one element, e.g. a mean over the batch)")
        return loss.reshape(())


def _check_takes_labels(model: nn.Module) -> None:
    """model.pass_labels needs a forward that accepts ``labels=`` (by name, or through **kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if "labels" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    raise ConfigError(f"model.pass_labels: {type(model).__name__}.forward takes no 'labels' argument; "
                      "allowed: false (the loss then comes from the output and data.task), or a model "
                      "whose forward takes labels=")
