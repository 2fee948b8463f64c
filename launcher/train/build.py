"""What a rank builds from the config before training: the network (zoo model or the user's factory),
and the optimizer (the loss is loss.py's). Shared by the trainer, the planner's profile and the
front door's strategy checks, so all three see the same model."""
from __future__ import annotations

import torch
from torch import nn

from lmsdp.launcher.config import Config, model_from_factory
from lmsdp.launcher.models import build_model


def build_network(config: Config) -> nn.Module:
    if config.model.factory:
        return model_from_factory(config.model, nn.Module)
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
