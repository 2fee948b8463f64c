"""Cost-aware recomputation (SuperNeurons): recompute cheap layers in backward instead of keeping
(and swapping) what they save.

Cost model. A layer's saved bytes cost ``2 * bytes / pcie_bandwidth`` to swap (out and back in), or
``bytes`` of device memory if kept. Recomputing a layer costs its forward again. Element-wise and
reduction-light layers (activations, norms, pooling, dropout) do O(1) work per element and run at device
memory bandwidth (TB/s, ~100x PCIe), so recomputing them is far cheaper than moving what they save;
convolutions, matmuls and attention do O(k) work per element and are kept/swapped instead.
Recomputation only pays where it removes saved tensors: a checkpointed run saves just its input, so

* a run of >= 2 consecutive cheap siblings in an ``nn.Sequential`` drops every tensor saved inside it,
* pooling drops its index tensor (int64, output-sized) and dropout its mask,

while a lone activation or norm would just trade its saved tensor for its input. ``auto`` therefore
wraps runs and pool/dropout layers; an explicit list wraps every listed kind (runs merged).
BatchNorm recomputation uses batch statistics and updates copies of the running statistics, so they
advance once per forward as without recomputation.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, List, Sequence, Set, Tuple, Type, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import RECOMPUTE_KINDS

_ACT: Tuple[Type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                                     nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                                     nn.Hardtanh, nn.Softplus, nn.PReLU)
KIND_TYPES = {
    "relu": (nn.ReLU, nn.ReLU6, nn.LeakyReLU),
    "gelu": (nn.GELU,),
    "silu": (nn.SiLU,),
    "activation": _ACT,
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "layernorm": (nn.LayerNorm,),
    "groupnorm": (nn.GroupNorm,),
    "norm": (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
             nn.modules.instancenorm._InstanceNorm),
    "pool": (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd),
    "dropout": (nn.modules.dropout._DropoutNd,),
}
_ALONE_WORTH_IT = ("pool", "dropout")


def _kinds(spec: Union[str, Sequence[str]]) -> Tuple[Set[str], bool]:
    if isinstance(spec, str):
        spec = [spec]
    names = {s.strip().lower() for s in spec}
    auto = "auto" in names
    if auto:
        names = set(RECOMPUTE_KINDS)
    bad = names - set(KIND_TYPES)
    if bad:
        raise ValueError(f"unknown recompute kinds {sorted(bad)}; choose 'auto' or from {list(RECOMPUTE_KINDS)}")
    return names, auto


def _matches(m: nn.Module, kinds: Set[str]) -> bool:
    return any(isinstance(m, KIND_TYPES[k]) for k in kinds)


class Recompute(nn.Module):
    """Runs ``body`` under non-reentrant checkpoint: only its input is saved; forward reruns in backward."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        for m in body:
            if getattr(m, "inplace", False):
                m.inplace = False  # an in-place op would overwrite the checkpoint's saved input
        self.body = body[0] if len(body) == 1 else nn.Sequential(*body)
        self.recomputing = False

    @contextmanager
    def _recompute_ctx(self) -> Iterator[None]:
        """During recomputation BatchNorm updates throw-away copies of its running statistics."""
        self.recomputing = True
        stash = [(m, m.running_mean, m.running_var, m.num_batches_tracked) for m in self.body.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        try:
            for m, mean, var, n in stash:
                m.running_mean = None if mean is None else mean.clone()
                m.running_var = None if var is None else var.clone()
                m.num_batches_tracked = None if n is None else n.clone()
            yield
        finally:
            for m, mean, var, n in stash:
                m.running_mean, m.running_var, m.num_batches_tracked = mean, var, n
            self.recomputing = False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.body(*args)
        return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (nullcontext(), self._recompute_ctx()))


def apply_recompute(model: nn.Module, spec: Union[str, Sequence[str]]) -> int:
    """Wrap cheap layers of ``model`` in :class:`Recompute` in place; returns the modules wrapped."""
    kinds, auto = _kinds(spec)
    return _apply(model, kinds, auto)


def _apply(parent: nn.Module, kinds: Set[str], auto: bool) -> int:
    if isinstance(parent, Recompute):
        return 0
    wrapped = 0
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules.keys())
        run: List[str] = []
        for name in names + [None]:  # type: ignore[list-item]
            child = parent._modules.get(name) if name is not None else None
            if child is not None and _matches(child, kinds):
                run.append(name)
                continue
            wrapped += _wrap_run(parent, run, kinds, auto)
            run = []
            if child is not None:
                wrapped += _apply(child, kinds, auto)
        return wrapped
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if _matches(child, kinds):
            wrapped += _wrap_run(parent, [name], kinds, auto)
        else:
            wrapped += _apply(child, kinds, auto)
    return wrapped


def _wrap_run(parent: nn.Module, run: List[str], kinds: Set[str], auto: bool) -> int:
    if not run:
        return 0
    mods = [parent._modules[n] for n in run]
    if auto and len(run) == 1 and not any(isinstance(mods[0], KIND_TYPES[k]) for k in _ALONE_WORTH_IT):
        return 0
    if len(run) == 1:
        parent._modules[run[0]] = Recompute(mods[0])
    else:  # the first slot runs the whole segment, the others become identities (keeps indices)
        parent._modules[run[0]] = Recompute(*mods)
        for n in run[1:]:
            parent._modules[n] = nn.Identity()
    return len(run)
