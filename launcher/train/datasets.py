"""The built-in datasets of config mode, each map-style (``len`` and ``[i]``) so the loader's sampler
decides the order: ``synthetic`` (seeded samples whose targets are a fixed function of the inputs, so
a loss curve falls), ``tokens`` (random windows of a flat file of token ids, as nanoGPT's train.bin)
and ``image_folder`` (one subfolder per class). Every sample ``i`` is a pure function of (seed, i)."""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from lmsdp.launcher.config.errors import ConfigError, UserError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
FEATURES = 64  # synthetic targets look at the input pooled to this many features


def mix(*values: int) -> int:
    """Stable 63-bit seed from a few integers (splitmix-style), independent of Python's hash salt."""
    acc = 0x9E3779B97F4A7C15
    for value in values:
        acc = (acc ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        acc ^= acc >> 31
    return acc & 0x7FFFFFFFFFFFFFFF


class SyntheticDataset(torch.utils.data.Dataset):
    """``length`` seeded samples for ``task`` whose targets follow a fixed rule a model can learn, so
    the loss falls: classify inputs are noise plus their class's fixed per-channel offset (a CNN's
    global pooling sees it at once), regress targets a fixed linear map of such offsets, lm a fixed
    stride from each token to the next, segment the sign of channel 0; token-id inputs (``vocab``) take
    their targets from a fixed projection of the pooled ids."""

    def __init__(self, task: str, shape: List[int], classes: int, length: int, seed: int, stream: int = 0,
                 vocab: Optional[int] = None) -> None:
        """``seed`` fixes the rule from inputs to targets; ``stream`` picks the samples (0: training,
        another number: validation samples that follow the same rule); ``vocab``: token-id inputs
        below it (text classifiers), their targets from the same rule on the ids scaled to [-0.5, 0.5)."""
        self.task, self.shape, self.classes, self.length, self.vocab = task, list(shape), classes, length, vocab
        self.seed = mix(seed, stream) if stream else seed
        gen = torch.Generator().manual_seed(mix(seed, -7))
        self.projection = torch.randn(FEATURES, classes, generator=gen)
        self.stride = 1 + 2 * int(torch.randint(0, max(1, classes // 2), [1], generator=gen))  # next token: + stride
        channels = self.shape[0] if self.shape else 1
        self.centers = torch.randn(classes, channels, generator=gen)        # classify: class -> channel offsets
        self.weights = torch.randn(channels, classes, generator=gen)        # regress: offsets -> targets

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(mix(self.seed, int(index)))
        if self.task == "lm":
            first = torch.randint(0, self.classes, [1], generator=gen)
            tokens = (first + torch.arange(self.shape[0] + 1) * self.stride) % self.classes
            return tokens[:-1], tokens[1:]
        if self.vocab:
            inputs = torch.randint(0, self.vocab, self.shape, generator=gen)
            signal = inputs.float() / self.vocab - 0.5
        else:
            inputs = signal = torch.randn(self.shape, generator=gen)
        if self.task == "segment":
            return inputs, (signal[0] > 0).long() % self.classes
        if not self.vocab:  # the target sits in the per-channel means of the input
            label = torch.randint(0, self.classes, [], generator=gen)
            offset = self.centers[label] if self.task == "classify" else torch.randn(len(self.centers[0]), generator=gen)
            inputs = inputs + offset.view(-1, *[1] * (inputs.dim() - 1))
            return inputs, (label if self.task == "classify" else offset @ self.weights)
        score = _pooled(signal) @ self.projection
        if self.task == "regress":
            return inputs, score
        return inputs, score.argmax()


def _pooled(inputs: torch.Tensor) -> torch.Tensor:
    """The input averaged into FEATURES contiguous chunks (zero-padded when shorter)."""
    flat = inputs.flatten()
    n = max(1, -(-flat.numel() // FEATURES))
    padded = torch.zeros(n * FEATURES)
    padded[:flat.numel()] = flat
    return padded.view(FEATURES, n).mean(1)


class TokenWindows(torch.utils.data.Dataset):
    """``length`` windows of ``seq_len`` + 1 tokens from a flat token file (memory-mapped), each at
    an offset fixed by (seed, index); (window[:-1], window[1:]) as int64."""

    def __init__(self, path: str, dtype: str, seq_len: int, length: int, seed: int, key: str = "data.path",
                 held_out: float = 0.0, validation: bool = False) -> None:
        self.path, self.seq_len, self.length, self.seed = path, seq_len, length, seed
        self.tokens = open_tokens(path, dtype, key)
        total = len(self.tokens)
        cut = total - int(total * held_out)  # the last ``held_out`` of the file is the validation split
        self.start, self.end = (cut, total) if validation else (0, cut)
        if self.end - self.start < seq_len + 1:
            raise ConfigError(f"{key}: {path} holds {self.end - self.start} tokens, fewer than one sequence of "
                              f"{seq_len} + 1; use a longer file or a shorter model seq_len")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        room = self.end - self.start - self.seq_len
        at = self.start + mix(self.seed, int(index)) % room
        window = torch.from_numpy(self.tokens[at:at + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


def open_tokens(path: str, dtype: str, key: str) -> np.ndarray:
    """The token file as a read-only memory map; a missing or misaligned file is one line naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: file not found: {path}")
    item = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    size = os.path.getsize(path)
    if size % item:
        raise ConfigError(f"{key}: {path} is {size} bytes, not a whole number of {dtype} tokens "
                          f"({item} bytes each); is data.dtype right?")
    if size == 0:
        raise ConfigError(f"{key}: {path} is empty")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


class ImageFolder(torch.utils.data.Dataset):
    """One subfolder per class (sorted names are the class ids) of image files, decoded with Pillow
    (in the loader's workers), resized to ``shape`` [C, H, W] and normalised to about [-1, 1]."""

    def __init__(self, path: str, shape: List[int], key: str = "data.path") -> None:
        self.path, self.shape, self.key = path, list(shape), key
        if not os.path.isdir(path):
            raise ConfigError(f"{key}: folder not found: {path}")
        self.classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if not self.classes:
            raise ConfigError(f"{key}: {path} has no class subfolders (expected {path}/<class>/<image files>)")
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(path, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise ConfigError(f"{key}: class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.samples += [(os.path.join(folder, f), label) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        file, label = self.samples[int(index)]
        channels, height, width = self.shape
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
                pixels = np.asarray(image, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UserError(f"{self.key}: cannot read image {file}: {exc}") from None
        tensor = torch.from_numpy(pixels.reshape(height, width, -1)).permute(2, 0, 1) / 127.5 - 1.0
        return tensor.contiguous(), torch.tensor(label)


def dataset_length(dataset: Any, key: str) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise ConfigError(f"{key}: must return a map-style Dataset (with __len__ and __getitem__)") from None
