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
A spec may also name modules (qualified names from ``named_modules()``, e.g. ``blocks.0.mlp``; a bare
word is a kind, so a top-level module is written ``module:head``): each named module is wrapped as a whole, and
consecutive named siblings of an ``nn.Sequential`` form one segment. The per-module planner
(``recompute_plan``) chooses such names by cost per byte freed.
BatchNorm recomputation uses batch statistics and updates copies of the running statistics, so they
advance once per forward as without recomputation.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Sequence, Set, Tuple, Type, Union

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
MODULE_PREFIX = "module:"


def is_kind(entry: str) -> bool:
    """Whether a spec entry names a layer kind (or 'auto') rather than a module."""
    return entry.strip().lower() in KIND_TYPES or entry.strip().lower() == "auto"


def module_entry(name: str) -> str:
    """The spec entry that names module ``name``: a dotted path as is, a bare word with ``module:``
    (a bare word is read as a kind)."""
    return name if "." in name and not name.startswith(MODULE_PREFIX) else MODULE_PREFIX + name


def split_spec(spec: Union[str, Sequence[str]]) -> Tuple[List[str], List[str]]:
    """(kinds, module names) of a recompute spec: entries that are kinds or 'auto', and the rest."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    kinds, modules = [], []
    for e in entries:
        if e.startswith(MODULE_PREFIX):
            modules.append(e[len(MODULE_PREFIX):])
        elif "." in e:
            modules.append(e)
        else:
            kinds.append(e)  # unknown words fail in _kinds with the list of kinds
    return kinds, modules


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
        self.run = len(body)  # > 1: a segment of siblings; their other slots became nn.Identity
        self.recomputing = False

    def __getattr__(self, name: str) -> Any:
        """A wrapped single module still answers for its attributes (Hugging Face's GPT-2 reads
        ``self.attn_dropout.p``); parameters, buffers and submodules come first, as in nn.Module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            body = self.__dict__.get("_modules", {}).get("body")
            if body is None or self.__dict__.get("run") != 1:
                raise
            return getattr(body, name)

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

    def forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        # keyword arguments pass through (torch's TransformerEncoder calls its layers with src_mask=...)
        if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.body(*args, **kwargs)
        return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (nullcontext(), self._recompute_ctx()), **kwargs)


def apply_recompute(model: nn.Module, spec: Union[str, Sequence[str]]) -> int:
    """Wrap the named modules, then cheap layers of the listed kinds, of ``model`` in :class:`Recompute`
    in place; returns the modules wrapped."""
    kind_entries, modules = split_spec(spec)
    wrapped = _apply_modules(model, modules) if modules else 0
    if kind_entries:
        kinds, auto = _kinds(kind_entries)
        wrapped += _apply(model, kinds, auto)
    return wrapped


def _apply_modules(model: nn.Module, names: Sequence[str]) -> int:
    """Wrap each named module; a module inside another named one runs inside that one's segment."""
    known = dict(model.named_modules())
    missing = sorted(n for n in set(names) if n not in known or n == "")
    if missing:
        raise ValueError(f"recompute: no module named {missing} in {type(model).__name__}; use qualified names "
                         "from named_modules() (e.g. 'layers.0.relu') or kinds ('auto', "
                         + ", ".join(RECOMPUTE_KINDS) + ")")
    chosen = set(names)
    outer = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]
    by_parent: Dict[str, List[str]] = {}
    for n in outer:
        parent, _, child = n.rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    wrapped = 0
    for parent_name in sorted(by_parent):
        parent = known[parent_name]
        picked = set(by_parent[parent_name])
        order = [c for c in parent._modules if c in picked]  # definition order: segments are deterministic
        if isinstance(parent, nn.Sequential):  # consecutive named siblings form one segment
            run: List[str] = []
            for c in list(parent._modules) + [None]:  # type: ignore[list-item]
                if c is not None and c in picked:
                    run.append(c)
                    continue
                wrapped += _wrap_run(parent, run, set(), False)
                run = []
        else:
            for c in order:
                wrapped += _wrap_run(parent, [c], set(), False)
    return wrapped


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
