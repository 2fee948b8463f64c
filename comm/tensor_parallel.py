"""Tensor-parallel plans, pure: which modules are split how, what each rank then holds and which
activation collectives a forward/backward implies. No process group, no DTensor: the layout planner
calls ``plan_tensor_parallel`` to price a mesh; ``comm/tp_apply.py`` turns the plan into torch's
``parallelize_module`` styles on a real mesh.

Where a plan comes from, first match wins:
1. ``comm.tp_plan: {module name: style}`` (names from ``named_modules()``): exactly those modules;
2. the model's own ``tensor_parallel_plan(tp, sequence_parallel)`` (the zoo GPT: Megatron's split),
   or its ``tensor_parallel_refusal`` (a one-line reason: the zoo ResNet and U-Net);
3. automatic: walking the module tree, two sibling ``nn.Linear`` with only elementwise modules
   between and ``out_features`` of the first == ``in_features`` of the second become colwise +
   rowwise (one all-reduce forward, one backward, as Megatron's MLP); an ``nn.Embedding`` is split
   by rows (vocabulary).
Every other module holding parameters is replicated over the tp ranks.

Styles (what a rank holds / what moves, for activations of ``rows`` x ``features``):
``colwise``  Linear: output features split (weight rows, bias); Embedding: embedding dim split.
``rowwise``  Linear: input features split, output all-reduced (reduce-scattered over the sequence
             under sequence parallelism); Embedding: vocabulary rows split, output all-reduced.
``colwise_gather``  colwise whose output is all-gathered whole (an LM head before the loss).
``gather_input``    a container whose input is made whole once for the colwise layers in it
             (all-gathered from sequence shards under sequence parallelism).
``sequence_parallel``  a norm computed on this rank's sequence shard (replicated when off).
``replicate``  kept whole on every tp rank (its input's gradient is all-reduced by the layers after it).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from torch import nn

from lmsdp.runtime.errors import UserError

STYLES: Dict[str, str] = {
    "colwise": "output features split (Linear) / embedding dim split (Embedding)",
    "rowwise": "input features split, output all-reduced (Linear) / vocabulary split (Embedding)",
    "colwise_gather": "colwise with the output all-gathered whole (e.g. an LM head before the loss)",
    "gather_input": "container: its input made whole once for the colwise layers inside",
    "sequence_parallel": "norm on the sequence shard (replicated without comm.sequence_parallel)",
    "replicate": "whole on every tp rank",
}
SPLIT_STYLES = ("colwise", "rowwise", "colwise_gather")
KEY = "comm.tp_plan"

ELEMENTWISE: Tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                                 nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                                 nn.Softplus, nn.Dropout, nn.Identity)
NORMS: Tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)


@dataclass(frozen=True)
class SplitModule:
    """One module of the plan: ``param_bytes`` of its own parameters (whole model), of which
    ``split_bytes`` are divided over the tp ranks (the rest replicated: a rowwise bias, norms)."""

    name: str
    style: str
    kind: str              # Linear | Embedding | <class name>
    param_bytes: int
    split_bytes: int


@dataclass(frozen=True)
class TPCollective:
    """One activation collective per micro-batch: over the tp group, on a tensor of
    ``rows x features`` elements (rows: batch x sequence for a transformer, batch for an MLP).
    ``nbytes`` is the whole activation's size; a ring moves (tp-1)/tp of it per rank."""

    module: str
    phase: str             # forward | backward
    op: str                # allreduce | allgather | reduce_scatter
    features: int

    def nbytes(self, rows: int, element_size: int = 4) -> int:
        return rows * self.features * element_size


@dataclass
class TensorParallelPlan:
    """What ``plan_tensor_parallel`` found; ``styles`` is what ``comm/tp_apply.py`` applies."""

    source: str                              # tp_plan | model | auto
    sequence_parallel: bool
    splits: List[SplitModule] = field(default_factory=list)
    collectives: List[TPCollective] = field(default_factory=list)
    replicated_bytes: int = 0                # parameters outside split modules (whole on every tp rank)
    ties: List[Tuple[str, str]] = field(default_factory=list)  # (param, param) sharing one tensor

    @property
    def styles(self) -> Dict[str, str]:
        return {s.name: s.style for s in self.splits}

    @property
    def split_bytes(self) -> int:
        return sum(s.split_bytes for s in self.splits)

    @property
    def total_bytes(self) -> int:
        return self.replicated_bytes + sum(s.param_bytes for s in self.splits)

    def param_bytes_per_rank(self, tp: int) -> int:
        """Parameter bytes one rank holds at tensor-parallel degree ``tp`` (before any dp sharding)."""
        return self.total_bytes - self.split_bytes + -(-self.split_bytes // tp)

    def collective_bytes(self, rows: int, element_size: int = 4) -> Dict[str, int]:
        """Whole-activation bytes per micro-batch by ``<phase>_<op>`` (e.g. ``forward_allreduce``)."""
        out: Dict[str, int] = {}
        for c in self.collectives:
            key = f"{c.phase}_{c.op}"
            out[key] = out.get(key, 0) + c.nbytes(rows, element_size)
        return out

    def describe(self) -> str:
        kinds: Dict[str, int] = {}
        for s in self.splits:
            if s.style in SPLIT_STYLES:
                kinds[s.style] = kinds.get(s.style, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "nothing split"
        share = self.split_bytes / self.total_bytes if self.total_bytes else 0.0
        return (f"tensor-parallel plan ({self.source}): {parts}; {share:.0%} of parameter bytes split"
                + (", sequence parallel" if self.sequence_parallel else ""))


def _own_params(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return list(module.named_parameters(recurse=False))


def _bytes(params: List[Tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() * p.element_size() for _, p in params)


def _split_bytes(module: nn.Module, style: str) -> int:
    """Bytes of ``module``'s own parameters that ``style`` divides over the tp ranks."""
    if style not in SPLIT_STYLES:
        return 0
    if style == "rowwise" and isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()  # the bias stays whole
    return _bytes(_own_params(module))


def placement_of(module: nn.Module, style: str, param: str) -> str:
    """``Shard(d)``/``Replicate`` of one parameter under ``style`` (tied parameters must agree)."""
    if style in ("colwise", "colwise_gather"):
        return "Shard(1)" if isinstance(module, nn.Embedding) else "Shard(0)"
    if style == "rowwise":
        if isinstance(module, nn.Embedding):
            return "Shard(0)"
        return "Shard(1)" if param == "weight" else "Replicate"
    return "Replicate"


# ------------------------------------------------------------------------------ where a plan comes from
def plan_tensor_parallel(model: nn.Module, tp_plan: Optional[Mapping[str, str]] = None,
                         sequence_parallel: bool = False, tp: int = 2) -> TensorParallelPlan:
    """The plan for ``model`` at degree ``tp`` (see the module docstring); bad plans, modules that
    do not divide by ``tp`` and refusals are one-line UserErrors. Works on a meta-device model."""
    if tp_plan:
        styles, source = _checked_config_plan(model, tp_plan, tp), "tp_plan"
    elif callable(getattr(model, "tensor_parallel_plan", None)):
        try:
            styles = dict(model.tensor_parallel_plan(tp, sequence_parallel))  # type: ignore[operator]
        except ValueError as exc:
            raise UserError(f"comm.mesh.tp: {exc}") from None
        source = "model"
    elif getattr(model, "tensor_parallel_refusal", None):
        raise UserError(f"comm.mesh.tp: {tp} has no tensor-parallel plan for {type(model).__name__}: "
                        f"{model.tensor_parallel_refusal}; use tp: 1 (comm.strategy: shard splits its state "
                        "instead)")
    else:
        styles, source = auto_styles(model, tp), "auto"
        if not any(s in SPLIT_STYLES for s in styles.values()):
            raise UserError(f"comm.mesh.tp: {tp}: no nn.Linear pair or nn.Embedding of {type(model).__name__} "
                            f"divides by {tp}; name modules in {KEY} or use tp: 1")
    _check_divisible(model, styles, tp)
    return _build(model, styles, source, sequence_parallel)


def auto_styles(model: nn.Module, tp: int) -> Dict[str, str]:
    """Sibling Linear pairs (only elementwise modules between, matching widths dividing by ``tp``)
    become colwise + rowwise; embeddings whose vocabulary divides by ``tp`` rowwise."""
    styles: Dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        pending: Optional[Tuple[str, nn.Linear]] = None
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear):
                if (pending is not None and pending[1].out_features == child.in_features
                        and child.in_features % tp == 0):
                    styles[pending[0]], styles[name] = "colwise", "rowwise"
                    pending = None
                else:
                    pending = (name, child)
            elif isinstance(child, nn.Embedding):
                if child.num_embeddings % tp == 0:
                    styles[name] = "rowwise"
                pending = None
            elif not isinstance(child, ELEMENTWISE):
                pending = None
    return styles


def _checked_config_plan(model: nn.Module, plan: Mapping[str, str], tp: int) -> Dict[str, str]:
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for name, style in plan.items():
        if name not in modules or not name:
            close = difflib.get_close_matches(str(name), names, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{KEY}.{name}: no module of that name in the model{guess}; names are "
                            f"named_modules() paths such as {', '.join(names[:4])}")
        if style not in STYLES:
            close = difflib.get_close_matches(str(style), list(STYLES), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{KEY}.{name}: '{style}' is not a style{guess}; allowed: {', '.join(STYLES)}")
        module = modules[name]
        if style in SPLIT_STYLES and not isinstance(module, (nn.Linear, nn.Embedding)):
            raise UserError(f"{KEY}.{name}: {style} splits nn.Linear or nn.Embedding, not "
                            f"{type(module).__name__}; allowed here: gather_input, replicate")
    return dict(plan)


def _check_divisible(model: nn.Module, styles: Mapping[str, str], tp: int) -> None:
    modules = dict(model.named_modules())
    for name, style in styles.items():
        module = modules.get(name)
        if module is None:
            raise UserError(f"{KEY}.{name}: no module of that name in the model")
        if style not in SPLIT_STYLES:
            continue
        if isinstance(module, nn.Linear):
            dim, what = ((module.in_features, "in_features") if style == "rowwise"
                         else (module.out_features, "out_features"))
        elif isinstance(module, nn.Embedding):
            dim, what = ((module.num_embeddings, "num_embeddings") if style == "rowwise"
                         else (module.embedding_dim, "embedding_dim"))
        else:
            continue
        if dim % tp:
            raise UserError(f"comm.mesh.tp: {tp} does not divide {name}'s {what} ({dim}) for its {style} split; "
                            f"allowed tp: a divisor of {dim}")


def _build(model: nn.Module, styles: Mapping[str, str], source: str, sp: bool) -> TensorParallelPlan:
    modules = dict(model.named_modules())
    plan = TensorParallelPlan(source=source, sequence_parallel=sp)
    owner: Dict[int, Tuple[str, str]] = {}  # param id -> (qualified name, placement)
    for name, module in modules.items():
        style = styles.get(name, "replicate")
        for pname, p in _own_params(module):
            full = f"{name}.{pname}" if name else pname
            placement = placement_of(module, style, pname)
            if id(p) in owner:
                other, other_placement = owner[id(p)]
                if other_placement != placement:
                    raise UserError(f"{KEY}: {full} is tied to {other} but their splits differ "
                                    f"({placement} vs {other_placement}); give both the same split")
                plan.ties.append((other, full))
            else:
                owner[id(p)] = (full, placement)
    seen: set = set()
    for name, module in modules.items():
        own = [(n, p) for n, p in _own_params(module) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        style = styles.get(name)
        if style is None:
            plan.replicated_bytes += _bytes(own)
            continue
        total = _bytes(own)
        split = min(total, _split_bytes(module, style)) if own else 0
        plan.splits.append(SplitModule(name, style, type(module).__name__, total, split))
    plan.collectives = _collectives(modules, styles, sp)
    return plan


def _input_features(module: nn.Module) -> int:
    """Width of a container's input: the in_features of the first Linear inside it."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
    return 0


def _collectives(modules: Mapping[str, nn.Module], styles: Mapping[str, str], sp: bool) -> List[TPCollective]:
    """The activation collectives DTensor issues for these styles (see the module docstring)."""
    gathered = [n for n, s in styles.items() if s == "gather_input"]
    out: List[TPCollective] = []

    def inside_gather(name: str) -> bool:
        return any(name.startswith(g + ".") for g in gathered)

    for name, style in styles.items():
        module = modules[name]
        if style == "gather_input":
            width = _input_features(module)
            if sp:
                out += [TPCollective(name, "forward", "allgather", width),
                        TPCollective(name, "backward", "reduce_scatter", width)]
            else:
                out.append(TPCollective(name, "backward", "allreduce", width))
        elif style in ("colwise", "colwise_gather") and isinstance(module, nn.Linear):
            if not inside_gather(name):
                if sp and style == "colwise_gather":
                    out += [TPCollective(name, "forward", "allgather", module.in_features),
                            TPCollective(name, "backward", "reduce_scatter", module.in_features)]
                else:
                    out.append(TPCollective(name, "backward", "allreduce", module.in_features))
            if style == "colwise_gather":
                out.append(TPCollective(name, "forward", "allgather", module.out_features))
        elif style == "rowwise":
            width = module.out_features if isinstance(module, nn.Linear) else module.embedding_dim
            if sp:
                out += [TPCollective(name, "forward", "reduce_scatter", width),
                        TPCollective(name, "backward", "allgather", width)]
            else:
                out.append(TPCollective(name, "forward", "allreduce", width))
    return out
