"""Model factories that go wrong the ways users' factories do (for the bad-input tests)."""
from torch import nn


def plain(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), nn.Linear(width, 10))


def raises(width: int = 4) -> nn.Module:
    raise ValueError(f"cannot build a model of width {width}")


def not_a_module() -> dict:
    return {"layers": 3}
