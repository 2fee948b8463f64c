"""What a rank builds from the config before training: the network (zoo model or the user's factory),
the optimizer, and the loss for the data's task. Shared by the trainer, the planner's profile and the
front door's strategy checks, so all three see the same model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmsdp.launcher.config import Config, resolve_factory
from lmsdp.launcher.config.input_checks import built_by_factory
from lmsdp.launcher.models import build_model


def build_network(config: Config) -> nn.Module:
    if config.model.factory:
        return built_by_factory(resolve_factory(config.model.factory, "model.factory"), config.model.kwargs,
                                "model.factory", config.model.factory, nn.Module)
    return build_model(config.model.name, **config.model.kwargs)


def amp_dtype(config: Config) -> "torch.dtype | None":
    """The autocast dtype of ``train.amp`` (None when AMP is off)."""
    if not config.train.amp:
        return None
    return torch.float16 if config.train.amp_dtype == "float16" else torch.bfloat16


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, **opt.kwargs)
    cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    return cls(params, lr=opt.lr, weight_decay=opt.weight_decay, **opt.kwargs)


def compute_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "regress":
        return F.mse_loss(output.float(), target.float())
    if task == "lm":
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())
    return F.cross_entropy(output.float(), target)
