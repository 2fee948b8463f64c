"""Profile one training step for the swap planner: every saved tensor (size, producing module, pack
time, first use in backward), forward / backward time, parameter, gradient, optimizer and workspace bytes.

Saved-tensor sizes and order do not depend on the device, so they come from a run under
``FakeTensorMode`` at the planned batch: no memory, no compute, any batch size, AMP included. The same
hooks the engine uses record every saved tensor (same filters, same dedupe), its producing module, its
pack index and its first use in backward; ``torch.utils.flop_counter`` counts FLOPs per module. Time
comes from one real step at a small batch on the job's device (the same hooks stamp every pack and first
use), scaled to the planned batch by the FLOP ratio; without such a run (or when its tensors do not line
up with the fake run's) events are placed by cumulative FLOPs. ``link_bandwidth`` and ``device_flops``
measure the machine's rates the models need. The memory and time models are in ``plan_models``, the
search in ``planner``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lmsdp.runtime.errors import UserError

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


@dataclass
class SavedTensor:
    """One saved tensor as the engine's pack hook sees it (after dedupe), threshold not yet applied."""

    nbytes: int
    module: str          # innermost module running when it was saved ('' = outside any module)
    pack_s: float        # compute seconds from forward start to this pack
    use_s: float         # compute seconds from backward start to its first use (-1: never used)
    use_rank: int        # position in the first-use order (-1: never used)
    packers: Tuple[str, ...] = ()   # every module that saved it (autograd saves one tensor for several ops)


@dataclass
class StepProfile:
    """One step of one model variant at one batch size."""

    batch: int
    recompute: RecomputeSpec
    tensors: List[SavedTensor]
    forward_s: float
    backward_s: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    workspace_bytes: int
    flops: int
    module_flops: Dict[str, int]
    module_forward_s: Dict[str, float]
    module_backward_s: Dict[str, float]  # backward compute ending at first uses of the module's tensors
    recomputed: List[str]            # original names of modules run again in backward
    timed: str                       # how times were obtained (for the report)
    module_forward_flops: Dict[str, int] = field(default_factory=dict)
    # per module called once in forward: its inputs that need grad, as (saved tensor index or -1, bytes)
    module_inputs: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    held_bytes: int = 0              # recompute segments' inputs no saved tensor holds (checkpoint keeps them)
    recompute_bytes: int = 0         # saved bytes of the largest recomputed module, live again in its backward

    @property
    def fixed_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    def candidates(self, threshold: int) -> List[int]:
        """Indices into ``tensors`` of the engine's candidates (its handle seq order) for ``threshold``."""
        return [i for i, t in enumerate(self.tensors) if t.nbytes >= threshold and t.nbytes > 0]


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
        if t.layout != torch.strided or (t.requires_grad and t.is_leaf) or t.numel() == 0:
            return (None, t)
        if self.device is not None and t.device != self.device:
            return (None, t)
        base = t._base
        if base is not None and base.requires_grad and base.is_leaf:
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
            loss = workload.loss(model(inputs), targets)
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


def optimizer_state_bytes(workload: Workload) -> int:
    """Optimizer state after one step of a tiny stand-in: the state per parameter byte is what counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = workload.build_model()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt = workload.build_optimizer(model)
        try:
            opt.step()
        except Exception:  # an optimizer that cannot step on fake tensors: assume Adam-like (2 states)
            return 2 * sum(p.nbytes for p in model.parameters() if p.requires_grad)
        return sum(v.nbytes for state in opt.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)


def profile_workload(workload: Workload, batch: int, recompute: RecomputeSpec = None,
                     device: Union[str, torch.device] = "cpu", time_batch: Optional[int] = None,
                     optimizer_bytes: Optional[int] = None, flops_rate: Optional[float] = None) -> StepProfile:
    """Profile one step at ``batch``: sizes from a fake run, times from a real run at ``time_batch``
    (default: ``batch``; 0: no real run, times from FLOPs at ``flops_rate`` FLOP/s, default the device's
    measured matmul rate: how a CPU machine plans for a GPU it does not have)."""
    device = torch.device(device)
    fake, flops_by_module, forward_flops, params, grads, names, facts = _fake_profile(workload, batch, recompute)
    total_flops = max(1, flops_by_module.get("", 0))
    tb = batch if time_batch is None else time_batch
    if flops_rate:
        tb = 0
    module_s: Dict[str, float] = {}
    workspace = 0
    real: Optional[_Recorder] = None
    if tb > 0:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        torch.manual_seed(0)
        model = _apply(workload.build_model().to(device), recompute)
        for _ in range(2):  # warm-up: allocator, kernel caches and lazy init take a step or two
            _run_step(workload, model, tb, device, _Recorder(time.perf_counter, device), {}, sync)
            model.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        runs = []
        for _ in range(3):  # the median of three timed steps: one slowed by a busy machine does not count
            model.zero_grad(set_to_none=True)
            rec, mod_s = _Recorder(time.perf_counter, device), {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            fw_bw = _run_step(workload, model, tb, device, rec, mod_s, sync)
            if device.type == "cuda":
                workspace = max(workspace, torch.cuda.max_memory_allocated(device) - base - sum(rec.sizes) - grads)
            runs.append((fw_bw, rec, mod_s))
        (fw, bw), real, module_s = sorted(runs, key=lambda r: sum(r[0]))[1]
        del model
    if real is not None and len(real.sizes) == len(fake.sizes) and real.order == fake.order:
        fake_tb = _fake_profile(workload, tb, recompute)[1].get("", 0) if tb != batch else total_flops
        scale = total_flops / max(1, fake_tb)
        pack_t, use_t = [t * scale for t in real.pack_t], {i: t * scale for i, t in real.use_t.items()}
        forward_s, backward_s = fw * scale, bw * scale
        module_forward_s = {facts.rename(k): v * scale for k, v in module_s.items()}
        timed = f"measured on {device.type} at batch {tb}" + (f", scaled x{scale:.2f} by FLOPs" if tb != batch else "")
        workspace = int(workspace * scale)
    else:  # events placed by cumulative FLOPs at the device's rate
        rate = flops_rate or ((total_flops / max(1e-9, fw + bw) * (batch / tb)) if real is not None
                              else device_flops(device))
        pack_t = [f / rate for f in fake.pack_t]
        use_t = {i: f / rate for i, f in fake.use_t.items()}
        forward_s = fake.t_backward / rate if fake.t_backward else total_flops / 3 / rate
        backward_s = total_flops / rate - forward_s
        module_forward_s = {k: v / rate for k, v in forward_flops.items()}
        timed = f"from FLOPs at {rate / 1e9:.1f} GFLOP/s ({device.type})"
    if not workspace:  # CPU / no measurement: a layer's output and its gradient, the largest of them
        workspace = 2 * max(fake.sizes, default=0)
    tensors = _saved_tensors(fake, facts, pack_t, use_t)
    opt_bytes = optimizer_state_bytes(workload) if optimizer_bytes is None else optimizer_bytes
    return StepProfile(batch, recompute, tensors, forward_s, backward_s, params, grads, opt_bytes, workspace,
                       total_flops, {k: v for k, v in flops_by_module.items() if k}, module_forward_s,
                       backward_by_module(tensors), names, timed, forward_flops, facts.inputs, facts.held_bytes)


def _saved_tensors(fake: _Recorder, facts: _ModuleFacts, pack_t: Sequence[float],
                   use_t: Dict[int, float]) -> List[SavedTensor]:
    rank = {idx: r for r, idx in enumerate(fake.order)}
    return [SavedTensor(n, facts.rename(m), p, use_t.get(i, -1.0), rank.get(i, -1),
                        tuple(facts.rename(x) for x in fake.packers[i]))
            for i, (n, m, p) in enumerate(zip(fake.sizes, fake.modules, pack_t))]


def backward_by_module(tensors: Sequence[SavedTensor]) -> Dict[str, float]:
    """Backward compute per module: the time before each first use goes to the module that saved the
    tensor used (autograd reads a node's saved tensors when it runs that node's backward)."""
    out: Dict[str, float] = {}
    last = 0.0
    for t in sorted((t for t in tensors if t.use_rank >= 0), key=lambda t: t.use_rank):
        out[t.module] = out.get(t.module, 0.0) + max(0.0, t.use_s - last)
        last = max(last, t.use_s)
    return out


def device_flops(device: torch.device) -> float:
    """Achieved matmul FLOP/s on ``device`` (a 1024^2 product, median of 5)."""
    a = torch.randn(1024, 1024, device=device)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / sorted(times)[2]


def link_bandwidth(device: Union[str, torch.device]) -> float:
    """Bytes/s of one direction of the swap link: pinned device<->host copies on CUDA, a host copy
    (what the loopback transport does) on CPU. Median of 5 copies of 64 MiB."""
    device = torch.device(device)
    n = 64 << 20
    if device.type == "cuda":
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    else:
        src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[2]


def variant_key(recompute: RecomputeSpec) -> str:
    """Key of a recompute variant in ``profile_variants``' result (and in plan tables)."""
    return "none" if not recompute else (recompute if isinstance(recompute, str) else ",".join(recompute))


def profile_variants(workload: Workload, batch: int, device: Union[str, torch.device] = "cpu",
                     time_batch: Optional[int] = None,
                     variants: Sequence[RecomputeSpec] = RECOMPUTE_VARIANTS,
                     flops_rate: Optional[float] = None) -> Dict[str, StepProfile]:
    """One profile per recompute variant (the optimizer state is measured once); ``None`` always included."""
    variants = [None] + [v for v in variants if v]
    out: Dict[str, StepProfile] = {}
    opt_bytes = optimizer_state_bytes(workload)
    for r in variants:
        key = variant_key(r)
        if key not in out:
            out[key] = profile_workload(workload, batch, r, device, time_batch, opt_bytes, flops_rate)
    base = out[variant_key(None)]
    for key, prof in out.items():
        if key != "none":
            _align_times(prof, base)
    return out


def _align_times(prof: StepProfile, base: StepProfile) -> None:
    """A recompute variant's step = the base step + the forward time of the layers it runs again.
    Separate timed runs would differ by noise more than by the recompute itself, so the variant keeps
    only the shape of its own timeline and takes its totals from the base profile."""
    extra = sum(base.module_forward_s.get(name, 0.0) for name in prof.recomputed)
    fw_scale = base.forward_s / max(1e-12, prof.forward_s)
    bw_scale = (base.backward_s + extra) / max(1e-12, prof.backward_s)
    for t in prof.tensors:
        t.pack_s *= fw_scale
        if t.use_s >= 0:
            t.use_s *= bw_scale
    prof.forward_s, prof.backward_s = base.forward_s, base.backward_s + extra
    prof.recompute_bytes = max((subtree_bytes(base, name) for name in prof.recomputed), default=0)
    prof.timed = base.timed + f"; +{extra * 1e3:.1f} ms recompute"


def profile_aligned(workload: Workload, base: StepProfile, recompute: RecomputeSpec,
                    device: Union[str, torch.device] = "cpu") -> StepProfile:
    """A recompute variant profiled by a fake run only (events at the base step's FLOP rate) and
    aligned to the base step: what the per-module planner checks its estimate against."""
    rate = base.flops / max(1e-12, base.forward_s + base.backward_s)
    prof = profile_workload(workload, base.batch, recompute, device, 0, base.optimizer_bytes, rate)
    _align_times(prof, base)
    return prof


def subtree_bytes(profile: StepProfile, module: str) -> int:
    """Saved bytes of ``module`` and the modules inside it."""
    return sum(t.nbytes for t in profile.tensors if t.module == module or t.module.startswith(module + "."))


def sizes_profile(workload: Workload, batch: int, recompute: RecomputeSpec, optimizer_bytes: int) -> StepProfile:
    """Sizes and order only (a fake run; times are FLOP fractions of a nominal 1 s step)."""
    fake, flops, _forward, params, grads, names, facts = _fake_profile(workload, batch, recompute)
    total = max(1.0, float(flops.get("", 1)))
    tensors = _saved_tensors(fake, facts, [p / total for p in fake.pack_t],
                             {i: u / total for i, u in fake.use_t.items()})
    fw = fake.t_backward / total if fake.t_backward else 1 / 3
    return StepProfile(batch, recompute, tensors, fw, 1 - fw, params, grads, optimizer_bytes,
                       2 * max(fake.sizes, default=0), int(total), {}, {}, {}, names, "sizes only",
                       {}, facts.inputs, facts.held_bytes)


__all__ = ["RecomputeSpec", "RECOMPUTE_VARIANTS", "Workload", "FakeProfileError", "SavedTensor", "StepProfile", "profile_workload",
           "profile_variants", "sizes_profile", "optimizer_state_bytes", "backward_by_module", "recomputed_names",
           "variant_key", "link_bandwidth", "device_flops", "subtree_bytes", "original_names", "profile_aligned"]
