"""Record one training step for the planner: the same saved-tensor hooks as the engine (same filter,
same dedupe) with module attribution and a clock, run for real on the job's device or under
``FakeTensorMode`` (shapes only, FLOPs per module from ``torch.utils.flop_counter``). ``profile`` turns
these records into a ``StepProfile``. A model the fake run cannot execute (its step reads tensor values)
is one ``FakeProfileError`` line naming the config key."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from lmsdp.runtime.errors import UserError

from .candidates import is_swappable
from .handles import storage_span

RecomputeSpec = Union[None, str, List[str]]
RECOMPUTE_VARIANTS: Tuple[RecomputeSpec, ...] = (None, "auto", ["activation", "norm", "pool", "dropout"])


@dataclass
class Workload:
    """How to run one training step of the job: torch-only callables (the launcher builds them)."""

    build_model: Callable[[], nn.Module]
    make_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]   # batch size -> (inputs, targets)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    autocast: Optional[torch.dtype] = None
    label: str = "model"  # the config key that names the model, for errors about it
    forward: Optional[Callable[[nn.Module, Any, Any], Any]] = None  # (model, inputs, targets); None: model(inputs)

    def step_loss(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """The step's loss: ``loss(forward(...))`` (e.g. with ``labels=``), else ``loss(model(inputs))``."""
        output = self.forward(model, inputs, targets) if self.forward else model(inputs)
        return self.loss(output, targets)



class FakeProfileError(UserError):
    """The step cannot run on fake tensors, so the planner cannot size it (one line, no traceback)."""


def _fake_failure(exc: Exception) -> Optional[str]:
    """Why a fake run failed, in the user's words, when the step itself is the cause (else None)."""
    from torch._subclasses import fake_tensor as fake

    if isinstance(exc, fake.DataDependentOutputException):
        return ("its step reads a tensor's value (.item(), .tolist(), int(t) or 'if t:' in forward or the loss), "
                "which fake tensors do not have")
    if isinstance(exc, fake.DynamicOutputShapeException):
        return ("its step makes a tensor whose shape depends on values (e.g. nonzero, masked_select, boolean "
                "indexing), which fake tensors cannot size")
    if isinstance(exc, (fake.UnsupportedOperatorException, fake.UnsupportedFakeTensorException)):
        return f"its step uses an operator fake tensors cannot run ({str(exc)[:60]})"
    return None


class _Recorder:
    """saved_tensors_hooks pair that mirrors the engine's candidate filter and dedupe, with module
    attribution from forward pre/post hooks and a clock (wall time or cumulative FLOPs)."""

    def __init__(self, clock: Callable[[], float], device: Optional[torch.device] = None) -> None:
        self.clock = clock
        self.device = device  # real runs: only tensors on the job's device are candidates, as in the engine
        self.stack: List[str] = []
        self.keys: Dict[tuple, int] = {}
        self.keep: List[torch.Tensor] = []
        self.sizes: List[int] = []
        self.spans: List[int] = []        # bytes the engine copies: the storage span a view covers
        self.modules: List[str] = []
        self.pack_t: List[float] = []
        self.use_t: Dict[int, float] = {}
        self.order: List[int] = []
        self.t_forward = self.t_backward = 0.0
        self.backward_started = False
        self.packers: List[List[str]] = []
        self.inputs: Dict[str, List[Tuple[tuple, int]]] = {}   # module -> (key, bytes) of inputs needing grad
        self.calls: Dict[str, int] = {}

    @staticmethod
    def key(t: torch.Tensor) -> tuple:
        return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)

    def pack(self, t: torch.Tensor) -> Any:
        if self.backward_started:
            return (None, t)
        if not is_swappable(t) or (self.device is not None and t.device != self.device):
            return (None, t)
        key = self.key(t)
        idx = self.keys.get(key)
        here = self.stack[-1] if self.stack else ""
        if idx is not None and here not in self.packers[idx]:
            self.packers[idx].append(here)
        if idx is None:
            self.packers.append([here])
            idx = len(self.sizes)
            self.keys[key] = idx
            self.keep.append(t)  # alive until the profile ends: no storage reuse, as the engine's weakref check
            self.sizes.append(t.nbytes)
            self.spans.append(storage_span(t) * t.element_size())
            self.modules.append(self.stack[-1] if self.stack else "")
            self.pack_t.append(self.clock() - self.t_forward)
        return (idx, t)

    def unpack(self, packed: Any) -> torch.Tensor:
        idx, t = packed
        if idx is not None and idx not in self.use_t:
            if not self.backward_started:
                self.backward_started = True
                self.t_backward = self.clock()
            self.use_t[idx] = self.clock() - self.t_backward
            self.order.append(idx)
        return t

    def module_hooks(self, model: nn.Module, forward_s: Dict[str, float]) -> List[Any]:
        handles, starts = [], {}
        for name, mod in model.named_modules():
            def pre(_m: nn.Module, args: Any, name: str = name) -> None:
                if not self.backward_started:
                    self.stack.append(name)
                    starts[name] = self.clock()
                    self.calls[name] = self.calls.get(name, 0) + 1
                    self.inputs[name] = [(self.key(a), a.nbytes) for a in args
                                         if isinstance(a, torch.Tensor) and a.requires_grad and a.layout == torch.strided]

            def post(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
                if not self.backward_started and self.stack and self.stack[-1] == name:
                    self.stack.pop()
                    forward_s[name] = forward_s.get(name, 0.0) + self.clock() - starts.pop(name, self.clock())
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return handles


def recomputed_names(model: nn.Module) -> List[str]:
    """Original names of the modules that ``apply_recompute`` wrapped in ``model``."""
    from .recompute import Recompute

    out: List[str] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, Recompute):
            continue
        parent, _, first = path.rpartition(".")
        body = list(mod.body) if mod.run > 1 else [mod.body]
        out.append(path)
        if len(body) > 1:  # the run's other slots became nn.Identity siblings right after ``first``
            parent_mod = model.get_submodule(parent) if parent else model
            names = list(parent_mod._modules)
            i = names.index(first)
            out += [f"{parent}.{n}" if parent else n for n in names[i + 1:i + len(body)]]
    return out


def original_names(model: nn.Module) -> Callable[[str], str]:
    """Maps module paths of a model with Recompute wrappers back to the original module names
    ('blocks.0.mlp.body.2' -> 'blocks.0.mlp.2'; a segment's 'x.body.1' -> the sibling after 'x')."""
    from .recompute import Recompute

    prefixes: Dict[str, str] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, Recompute):
            continue
        if mod.run > 1:
            parent, _, first = path.rpartition(".")
            names = list((model.get_submodule(parent) if parent else model)._modules)
            i = names.index(first)
            for j, sibling in enumerate(names[i:i + mod.run]):
                prefixes[f"{path}.body.{j}"] = f"{parent}.{sibling}" if parent else sibling
        prefixes[f"{path}.body"] = path
    if not prefixes:
        return lambda name: name
    ordered = sorted(prefixes, key=len, reverse=True)

    def rename(name: str) -> str:
        for p in ordered:
            if name == p or name.startswith(p + "."):
                return prefixes[p] + name[len(p):]
        return name
    return rename


def _run_step(workload: Workload, model: nn.Module, batch: int, device: torch.device, rec: _Recorder,
              module_s: Dict[str, float], sync: Callable[[], None],
              after_forward: Callable[[], None] = lambda: None) -> Tuple[float, float]:
    inputs, targets = workload.make_batch(batch)
    inputs, targets = inputs.to(device), targets.to(device)
    hooks = rec.module_hooks(model, module_s)
    try:
        sync()
        rec.t_forward = rec.clock()
        ctx = (torch.autocast(device_type=device.type, dtype=workload.autocast) if workload.autocast
               else torch.autocast(device_type=device.type, enabled=False))
        with ctx, torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
            loss = workload.step_loss(model, inputs, targets)
        sync()
        forward = rec.clock() - rec.t_forward
        after_forward()
        rec.t_backward = rec.clock()
        loss.backward()
        sync()
        backward = rec.clock() - rec.t_backward
    finally:
        for h in hooks:
            h.remove()
    return forward, backward


def _apply(model: nn.Module, recompute: RecomputeSpec) -> nn.Module:
    if recompute:
        from .recompute import apply_recompute

        apply_recompute(model, recompute)
    return model


@dataclass
class _ModuleFacts:
    """What the fake run learns about modules (names already mapped back to the unwrapped model)."""

    rename: Callable[[str], str]
    inputs: Dict[str, List[Tuple[int, int]]]
    held_bytes: int


def _module_facts(rec: _Recorder, model: nn.Module) -> _ModuleFacts:
    from .recompute import Recompute

    rename = original_names(model)
    wrappers = {path for path, m in model.named_modules() if isinstance(m, Recompute)}
    held: Dict[tuple, int] = {}
    for path in wrappers:  # a checkpoint keeps its inputs in its closure, out of the hooks' sight
        for key, nbytes in rec.inputs.get(path, []):
            if key not in rec.keys:
                held[key] = nbytes
    inputs = {rename(m): [(rec.keys.get(k, -1), n) for k, n in ins] for m, ins in rec.inputs.items()
              if rec.calls.get(m) == 1 and m not in wrappers}
    return _ModuleFacts(rename, inputs, sum(held.values()))


def _fake_profile(workload: Workload, batch: int, recompute: RecomputeSpec
                  ) -> Tuple[_Recorder, Dict[str, int], Dict[str, int], int, int, List[str], _ModuleFacts]:
    """Sizes, order, modules and FLOPs (per module: forward + backward, and forward alone; '' = the
    step) at ``batch`` without memory or compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    rec = _Recorder(lambda: float(counter.get_total_flops()))
    forward_counts: Dict[str, Any] = {}

    def snapshot() -> None:  # the counter attributes backward FLOPs to modules too: keep forward apart
        forward_counts.update({k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()})

    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        # models that test pointers (nn.TransformerEncoder's fast path) make torch warn about FakeTensor
        # data pointers; the profile only needs shapes, and the user did nothing wrong
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        torch.manual_seed(0)
        model = _apply(workload.build_model(), recompute)
        params = sum(p.nbytes for p in model.parameters())
        grads = sum(p.nbytes for p in model.parameters() if p.requires_grad)
        try:
            with counter:
                _run_step(workload, model, batch, torch.device("cpu"), rec, {}, lambda: None, snapshot)
        except Exception as exc:  # noqa: BLE001 - only the step's own fake-tensor limits become one line
            reason = _fake_failure(exc)
            if reason is None:
                raise
            raise FakeProfileError(f"{workload.label} cannot run on the planner's fake tensors: {reason}; "
                                   "the planner needs a step that depends on shapes only (without it: "
                                   "swap.plan: none, and a batch chosen by hand or by lmsrun tune)") from None
        names = recomputed_names(model)
        facts = _module_facts(rec, model)
    by_module: Dict[str, int] = {}   # forward + backward FLOPs per module
    for key, ops in counter.get_flop_counts().items():
        if key != "Global":
            by_module[facts.rename(key.partition(".")[2])] = int(sum(ops.values()))
    by_module[""] = int(counter.get_total_flops())
    forward = {facts.rename(k.partition(".")[2]): v for k, v in forward_counts.items() if k != "Global"}
    return rec, by_module, forward, params, grads, names, facts
