"""Training and validation batches. Step ``s`` of rank ``r`` reads the samples at positions
``(s mod E) * size + r`` (in batches) of a permutation seeded by (seed, epoch): a pure function of
(seed, step, rank), so a resumed run -- mid-epoch, with loader workers -- sees exactly the batches an
uninterrupted one would, and 2 ranks x batch b read the same global batch as 1 rank x batch 2b.
Batches come from ``torch.utils.data.DataLoader`` worker processes (``data.workers``), prefetched and
pinned for CUDA; the datasets themselves are in ``datasets.py``."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from lmsdp.launcher.config import Config, resolve_factory
from lmsdp.launcher.config.errors import ConfigError, UserError
from lmsdp.launcher.models import model_io

from .datasets import ImageFolder, SyntheticDataset, TokenWindows, dataset_length, mix

Batch = Tuple[torch.Tensor, torch.Tensor]
AUTO_WORKERS = 2  # data.workers: auto for file-backed data


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
    if config.data.kind == "tokens" and config.data.task == "auto":
        task = "lm"
    return DataSpec(task, list(config.data.shape or shape), config.data.classes or classes, config.data.vocab)


def loader_workers(config: Config, cpus: int) -> int:
    """``data.workers``: the number, or auto (none for synthetic data, else up to 2, leaving the rank
    at least one core of its ``cpus``)."""
    workers = config.data.workers
    if isinstance(workers, int):
        return workers
    if config.data.kind == "synthetic":
        return 0
    return max(0, min(AUTO_WORKERS, cpus - 1))


class RankBatches:
    """This rank's batches of a map-style dataset; ``batch(step)`` reads one, ``iterate(a, b)``
    streams steps a..b-1 through the DataLoader's workers."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, size: int, key: str,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.seed, self.rank, self.size = dataset, batch_size, seed, rank, size
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.length = dataset_length(dataset, key)
        if self.length < batch_size * size:
            raise ConfigError(f"{key}: dataset has {self.length} samples, fewer than one global batch "
                              f"({batch_size} x {size} ranks)")
        self.steps_per_epoch = self.length // (batch_size * size)
        self._order: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def indices(self, step: int) -> List[int]:
        """The dataset indices of ``step``'s batch on this rank."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(mix(self.seed, epoch, -1))
            self._order = (epoch, torch.randperm(self.length, generator=gen))
        start = (index * self.size + self.rank) * self.batch_size
        return self._order[1][start:start + self.batch_size].tolist()  # type: ignore[index]

    def batch(self, step: int) -> Batch:
        return default_collate([self.dataset[i] for i in self.indices(step)])

    def iterate(self, first: int, stop: int) -> Iterator[Batch]:
        """Batches of steps ``first`` .. ``stop - 1`` in order, loaded ahead by the workers."""
        if first >= stop:
            return iter(())
        return _one_line_errors(iter(DataLoader(
            self.dataset, batch_sampler=_Steps(self, first, stop), num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None, pin_memory=self.pin_memory,
            worker_init_fn=_one_thread if self.workers else None, persistent_workers=False)))


class _Steps(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: one index list per step."""

    def __init__(self, batches: RankBatches, first: int, stop: int) -> None:
        self.batches, self.first, self.stop = batches, first, stop

    def __iter__(self) -> Iterator[List[int]]:
        return (self.batches.indices(step) for step in range(self.first, self.stop))

    def __len__(self) -> int:
        return self.stop - self.first


def _one_line_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    """A UserError raised in a loader worker (a corrupt image) arrives with the worker's traceback in
    its message; the user gets its own one line back."""
    try:
        yield from batches
    except UserError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        raise UserError(re.sub(r"^[\w.]*Error: ", "", last)) from None


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the rank's cores are its intra-op threads'


def make_batches(config: Config, rank: int, size: int, workers: int = 0, pin_memory: bool = False,
                 split: str = "train") -> Tuple[RankBatches, int]:
    """(this rank's batches of ``split`` -- train or val --, steps per epoch)."""
    dataset = _dataset(config, split)
    key = "data.factory" if config.data.kind == "factory" else ("data.val_path" if split == "val" and
                                                                 config.data.val_path else "data.path")
    batches = RankBatches(dataset, config.train.batch_size, config.train.seed + (split == "val"), rank, size, key,
                          workers, config.data.prefetch, pin_memory)
    return batches, batches.steps_per_epoch


def _dataset(config: Config, split: str) -> Dataset:
    data, train = config.data, config.train
    spec = data_spec(config)
    if data.kind == "synthetic":
        if split == "val":  # samples of their own: another seed stream, enough for every evaluation
            samples = max(config.eval.steps * train.batch_size * 64, train.batch_size)
            return SyntheticDataset(spec.task, spec.shape, spec.classes, samples, train.seed, stream=1, vocab=spec.vocab)
        return SyntheticDataset(spec.task, spec.shape, spec.classes, data.samples, train.seed, vocab=spec.vocab)
    if data.kind == "tokens":
        return _token_windows(config, spec, split)
    if data.kind == "image_folder":
        if split == "val" and data.val_path:
            return ImageFolder(data.val_path, spec.shape, "data.val_path")
        return _held_out(ImageFolder(data.path or "", spec.shape), config, split)
    dataset = resolve_factory(data.factory or "", "data.factory")(**data.kwargs)
    return _held_out(dataset, config, split)


def _token_windows(config: Config, spec: DataSpec, split: str) -> Dataset:
    data = config.data
    seq_len = spec.shape[0]
    if split == "val" and data.val_path:
        return TokenWindows(data.val_path, data.dtype, seq_len, data.samples, config.train.seed + 1, "data.val_path")
    return TokenWindows(data.path or "", data.dtype, seq_len, data.samples, config.train.seed + (split == "val"),
                        "data.path", held_out=data.val_fraction, validation=split == "val")


def _held_out(dataset: Dataset, config: Config, split: str) -> Dataset:
    """``data.val_fraction`` of a dataset held out by a seeded split (the same on every rank and run)."""
    fraction = config.data.val_fraction
    if not fraction:
        return dataset
    length = dataset_length(dataset, "data")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(mix(config.train.seed, -3))).tolist()
    held = max(1, int(math.floor(length * fraction)))
    return Subset(dataset, order[:held] if split == "val" else order[held:])


def has_validation(config: Config) -> bool:
    """Whether ``eval.every`` has a split to read: synthetic data always, others with val_path/val_fraction."""
    return config.data.kind == "synthetic" or bool(config.data.val_path) or config.data.val_fraction > 0
