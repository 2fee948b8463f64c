"""Model zoo: the LMS paper's workloads in pure torch, each with a default task and input shape."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from torch import nn

from .gpt import GPT
from .resnet import ResNet
from .unet3d import UNet3D


@dataclass(frozen=True)
class ZooEntry:
    """How to build a model and what data it eats by default."""

    build: Callable[..., nn.Module]
    task: str                                   # classify | lm | segment
    defaults: Dict[str, Any]
    input_shape: Callable[[Dict[str, Any]], List[int]]
    classes: Callable[[Dict[str, Any]], int]


def _resnet(depth: int) -> ZooEntry:
    return ZooEntry(ResNet, "classify", {"depth": depth, "num_classes": 10, "stem": "cifar"},
                    lambda kw: [kw.get("in_channels", 3), 32, 32] if kw.get("stem") == "cifar"
                    else [kw.get("in_channels", 3), 224, 224],
                    lambda kw: kw["num_classes"])


ZOO: Dict[str, ZooEntry] = {
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "resnet152": _resnet(152),
    "resnet": _resnet(18),
    "gpt": ZooEntry(GPT, "lm", {"vocab": 1024, "seq_len": 128, "layers": 4, "width": 256, "heads": 4},
                    lambda kw: [kw["seq_len"]], lambda kw: kw["vocab"]),
    "unet3d": ZooEntry(UNet3D, "segment", {"in_channels": 1, "classes": 2, "width": 8, "levels": 3},
                       lambda kw: [kw["in_channels"], 32, 32, 32], lambda kw: kw["classes"]),
}
MODEL_NAMES: List[str] = list(ZOO)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name``; ``kwargs`` override its defaults (e.g. depth=152, width=128)."""
    entry = ZOO[name]
    return entry.build(**{**entry.defaults, **kwargs})


def model_io(name: str, kwargs: Dict[str, Any]) -> Tuple[str, List[int], int]:
    """(task, input shape of one sample, classes) for zoo model ``name`` built with ``kwargs``."""
    entry = ZOO[name]
    merged = {**entry.defaults, **kwargs}
    return entry.task, entry.input_shape(merged), entry.classes(merged)


__all__ = ["GPT", "ResNet", "UNet3D", "ZOO", "MODEL_NAMES", "build_model", "model_io"]
