"""Training batches that depend only on (seed, step, rank): a resumed run sees exactly the batches
an uninterrupted one would, on any number of restarts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from lmsdp.launcher.config import Config, resolve_factory
from lmsdp.launcher.config.errors import ConfigError
from lmsdp.launcher.models import model_io


@dataclass
class DataSpec:
    task: str
    shape: List[int]
    classes: int
    vocab: Optional[int] = None  # token-id inputs below this (lm: classes when unset)


def data_spec(config: Config) -> DataSpec:
    """Resolve task, sample shape and classes from the data section, falling back to the model's."""
    task, shape, classes = "classify", [3, 32, 32], 10
    if not config.model.factory:
        task, shape, classes = model_io(config.model.name, config.model.kwargs)
    if config.data.task != "auto":
        task = config.data.task
    return DataSpec(task, list(config.data.shape or shape), config.data.classes or classes, config.data.vocab)


class SyntheticBatches:
    """Seeded random inputs and targets shaped for the task; batch ``step`` of ``rank`` is fixed."""

    def __init__(self, spec: DataSpec, batch_size: int, seed: int, rank: int) -> None:
        self.spec, self.batch_size, self.seed, self.rank = spec, batch_size, seed, rank

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_mix(self.seed, step, self.rank))
        spec, n = self.spec, self.batch_size
        if spec.task == "lm":
            tokens = torch.randint(0, spec.vocab or spec.classes, [n, spec.shape[0] + 1], generator=gen)
            return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        inputs = (torch.randint(0, spec.vocab, [n, *spec.shape], generator=gen) if spec.vocab
                  else torch.randn([n, *spec.shape], generator=gen))
        if spec.task == "segment":
            return inputs, torch.randint(0, spec.classes, [n, *spec.shape[1:]], generator=gen)
        if spec.task == "regress":
            return inputs, torch.randn([n, spec.classes], generator=gen)
        return inputs, torch.randint(0, spec.classes, [n], generator=gen)


class DatasetBatches:
    """A user's map-style Dataset, reshuffled per epoch with a seeded permutation and split by rank."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int, size: int) -> None:
        self.dataset, self.batch_size, self.seed, self.rank, self.size = dataset, batch_size, seed, rank, size
        try:
            self.length = len(dataset)
        except TypeError:
            raise ConfigError("data.factory: must return a map-style Dataset (with __len__ and __getitem__)") from None
        if self.length < batch_size * size:
            raise ConfigError(f"data.factory: dataset has {self.length} samples, fewer than one global batch "
                              f"({batch_size} x {size} ranks)")
        self.steps_per_epoch = self.length // (batch_size * size)

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(_mix(self.seed, epoch, -1)))
        start = (index * self.size + self.rank) * self.batch_size
        samples = [self.dataset[int(i)] for i in order[start:start + self.batch_size]]
        inputs, targets = zip(*samples)
        return torch.stack([torch.as_tensor(x) for x in inputs]), torch.stack([torch.as_tensor(t) for t in targets])


def make_batches(config: Config, rank: int, size: int) -> Tuple[Any, int]:
    """(batch source with .batch(step), steps per epoch)."""
    train = config.train
    if config.data.kind == "factory":
        dataset = resolve_factory(config.data.factory or "", "data.factory")(**config.data.kwargs)
        source = DatasetBatches(dataset, train.batch_size, train.seed, rank, size)
        return source, source.steps_per_epoch
    steps_per_epoch = max(1, math.ceil(config.data.samples / (train.batch_size * size)))
    return SyntheticBatches(data_spec(config), train.batch_size, train.seed, rank), steps_per_epoch


def _mix(*values: int) -> int:
    """Stable 63-bit seed from a few integers (splitmix-style), independent of Python's hash salt."""
    acc = 0x9E3779B97F4A7C15
    for value in values:
        acc = (acc ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        acc ^= acc >> 31
    return acc & 0x7FFFFFFFFFFFFFFF
