"""Which device the swap engine serves, and saying so when the saved tensors are somewhere else.

An engine built for ``cuda`` before ``torch.cuda.set_device`` is bound to the device current at that
moment; tensors of another GPU are not candidates, so it would swap nothing without a word. Two
checks, each warning once: at a step's first pack (the current device is not the engine's) and at
step end (no candidate on the engine's device, but tensors of the threshold's size on another GPU).
On CPU, the loopback transport keeps swapped tensors in host memory: swapping there saves nothing.
"""
from __future__ import annotations

import warnings

import torch

_cpu_warned = False


def warn_cpu_once(device: torch.device) -> None:
    global _cpu_warned
    if not _cpu_warned:
        _cpu_warned = True
        warnings.warn(f"lmsdp swap: the engine runs on {device} with the loopback transport; swapped "
                      "tensors stay in host memory, so swapping saves no memory here (it only exercises "
                      "the swap paths)", RuntimeWarning, stacklevel=3)


class DeviceBinding:
    """The engine's device: ``holds(t)`` on the pack path, the mismatch warnings around it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.index = -1 if device.type == "cpu" else (device.index or 0)
        self.cuda = device.type == "cuda"
        self.foreign = 0          # this step: saved tensors >= threshold on another GPU
        self.warned = False

    def holds(self, t: torch.Tensor) -> bool:
        if self.index < 0:
            return t.is_cpu
        return t.is_cuda and t.get_device() == self.index

    def elsewhere(self, t: torch.Tensor) -> None:
        """A saved tensor of candidate size not on the engine's device."""
        if t.is_cuda:
            self.foreign += 1

    def check_current(self) -> None:
        """At a step's first pack: the current CUDA device should be the engine's."""
        if self.cuda and not self.warned and torch.cuda.current_device() != self.index:
            self._warn(f"the current device is cuda:{torch.cuda.current_device()}")

    def check_step(self, candidates: int) -> None:
        """At step end: nothing was a candidate here while other GPUs' tensors were."""
        if self.foreign and not candidates and not self.warned:
            self._warn(f"{self.foreign} saved tensors of candidate size were on another GPU")
        self.foreign = 0

    def _warn(self, what: str) -> None:
        self.warned = True
        warnings.warn(f"lmsdp swap: the engine is bound to {self.device} but {what}: tensors there are not "
                      "swapped; build the engine after torch.cuda.set_device(), or pass device=",
                      RuntimeWarning, stacklevel=4)
